"""The oracle: the (gated) delta rule token by token (`lax.scan`, float32), and the decode step.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        S [K, V]
        = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    o_t = S_t^T (scale * q_t)

a_t = exp(log_a_t) (1 without log_a: DeltaNet). In the [K, V] orientation the Householder-like
factor multiplies from the left; the second line is the "delta": the state moves its prediction
for key k_t towards v_t by beta_t. Packed rows follow `segments.scan_packed_rows`.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


def _recurrence(q, k, v, beta, log_a, state):
    """float32 q, k [B,H,K], v [B,H,V], beta, log_a [B,H], state [B,H,K,V] -> (o [B,H,V], state)."""
    highest = lax.Precision.HIGHEST
    decayed = jnp.exp(log_a)[..., None, None] * state
    predicted = jnp.einsum("bhk,bhkv->bhv", k, decayed, precision=highest)
    state = decayed + beta[..., None, None] * k[..., :, None] * (v - predicted)[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state, precision=highest), state


def delta_step(q, k, v, beta, state, *, log_a=None, scale=None):
    """One decode step for a batch of rows, with the semantics of `chunk_delta_rule`.

    q, k [B,H,K]; v [B,H,V]; beta [B,H]; state [B,H,K,V] float32; log_a [B,H] or None.
    Returns (o [B,H,V] in q.dtype, new state [B,H,K,V] float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    log_a = jnp.zeros(beta.shape, jnp.float32) if log_a is None else f32(log_a)
    out, state = _recurrence(f32(q) * scale, f32(k), f32(v), f32(beta), log_a, state)
    return out.astype(q.dtype), state


def delta_reference(q, k, v, beta, *, log_a, scale, initial_state, segment_ids, chunk_size=None):
    """q, k [B,T,H,K]; v [B,T,H,V]; beta, log_a [B,T,H] float32; initial_state [B,H,K,V] or None;
    segment_ids [B,T] or None. Returns (o [B,T,H,V] in q.dtype, final_state [B,H,K,V] float32).
    `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    batch, _, heads, key_dim = q.shape
    initial_state = initial_state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
    time_major = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)

    def recurrence(state, token):
        q_t, k_t, v_t, beta_t, log_a_t = token
        return _recurrence(q_t * scale, k_t, v_t, beta_t, log_a_t, state)

    tokens = tuple(map(time_major, (q, k, v, beta, log_a)))
    out, final_state = scan_packed_rows(recurrence, initial_state, tokens, segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
