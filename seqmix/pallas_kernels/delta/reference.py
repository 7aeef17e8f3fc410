"""The oracle: the (gated) delta rule token by token (`lax.scan`, float32), and the decode step.

    S'_t = Diag(exp(log_gate_t)) S_{t-1}                           S [K, V]
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  = (I - beta_t k_t k_t^T) S'_t + beta_t k_t v_t^T
    o_t  = S_t^T (scale * q_t)

log_gate_t is one log decay per head (Gated DeltaNet's log_a, broadcast over the keys), one per key
(KDA's log_g), or zero (DeltaNet). In the [K, V] orientation the Householder-like factor multiplies
from the left; the second form of S_t is the "delta": the state moves its prediction for key k_t
towards v_t by beta_t. Packed rows follow `segments.scan_packed_rows`; grouped value heads
`grouped_heads`.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.log_gates import log_gate_of
from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


def _recurrence(q, k, v, beta, log_gate, state):
    """float32 q, k [B,H,K], v [B,H,V], beta [B,H], log_gate [B,H,W] (W = K or 1), state [B,H,K,V]
    -> (o [B,H,V], state)."""
    highest = lax.Precision.HIGHEST
    decayed = jnp.exp(log_gate)[..., :, None] * state
    predicted = jnp.einsum("bhk,bhkv->bhv", k, decayed, precision=highest)
    state = decayed + beta[..., None, None] * k[..., :, None] * (v - predicted)[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state, precision=highest), state


def delta_step(q, k, v, beta, state, *, log_a=None, log_g=None, scale=None):
    """One decode step for a batch of rows, with the semantics of `chunk_delta_rule`.

    q, k [B,Hk,K]; v [B,Hv,V]; beta [B,Hv]; state [B,Hv,K,V] float32; log_a [B,Hv] or log_g
    [B,Hv,K] (or neither). Returns (o [B,Hv,V] in q.dtype, new state [B,Hv,K,V] float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: repeat_to_value_heads(x.astype(jnp.float32), v.shape[-2])
    out, state = _recurrence(f32(q) * scale, f32(k), v.astype(jnp.float32), beta.astype(jnp.float32),
                             log_gate_of(log_g, log_a, beta.shape), state)
    return out.astype(q.dtype), state


def delta_reference(q, k, v, beta, *, log_gate, scale, initial_state, segment_ids, chunk_size=None):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; beta [B,T,Hv] and log_gate [B,T,Hv,W] float32;
    initial_state [B,Hv,K,V] or None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype,
    final_state [B,Hv,K,V] float32). `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    batch, _, value_heads, value_dim = v.shape
    key_dim = q.shape[-1]
    initial_state = initial_state_or_zeros(initial_state, batch, value_heads, key_dim, value_dim)
    time_major = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)
    q, k = (repeat_to_value_heads(x, value_heads) for x in (q, k))

    def recurrence(state, token):
        q_t, k_t, v_t, beta_t, gate_t = token
        return _recurrence(q_t * scale, k_t, v_t, beta_t, gate_t, state)

    tokens = tuple(map(time_major, (q, k, v, beta, log_gate)))
    out, final_state = scan_packed_rows(recurrence, initial_state, tokens, segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
