"""The oracle: the DPLR generalized delta rule token by token (`lax.scan`, float32), and the decode step.

    S_t = Diag(exp(log_g_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        S [K, V]
    o_t = S_t^T (scale * q_t)

The transition Diag(exp(log_g_t)) + b_t a_t^T is diagonal plus rank one; a_t reads the previous,
undecayed state (fla's `chunk_dplr_delta_rule` convention). Packed rows follow
`segments.scan_packed_rows`; grouped value heads `grouped_heads`.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


def _recurrence(q, k, v, a, b, log_g, state):
    """float32 q, k, a, b, log_g [B,H,K], v [B,H,V], state [B,H,K,V] -> (o [B,H,V], state)."""
    highest = lax.Precision.HIGHEST
    removed = jnp.einsum("bhk,bhkv->bhv", a, state, precision=highest)
    state = (jnp.exp(log_g)[..., :, None] * state + b[..., :, None] * removed[..., None, :]
             + k[..., :, None] * v[..., None, :])
    return jnp.einsum("bhk,bhkv->bhv", q, state, precision=highest), state


def dplr_step(q, k, v, a, b, state, *, log_g, scale=None):
    """One decode step for a batch of rows, with the semantics of `chunk_dplr`.

    q, k [B,Hk,K]; v [B,Hv,V]; a, b, log_g [B,Hv,K]; state [B,Hv,K,V] float32 (Hv a multiple of
    Hk). Returns (o [B,Hv,V] in q.dtype, new state [B,Hv,K,V] float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    by_value_head = lambda x: repeat_to_value_heads(f32(x), v.shape[-2])
    out, state = _recurrence(by_value_head(q) * scale, by_value_head(k), f32(v), f32(a), f32(b), f32(log_g),
                             state.astype(jnp.float32))
    return out.astype(q.dtype), state


def dplr_reference(q, k, v, *, a, b, log_g, scale, initial_state, segment_ids, chunk_size=None):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; a, b, log_g [B,T,Hv,K] float32; initial_state [B,Hv,K,V] or
    None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state [B,Hv,K,V]
    float32). `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    batch, _, value_heads, value_dim = v.shape
    initial_state = initial_state_or_zeros(initial_state, batch, value_heads, q.shape[-1], value_dim)
    time_major = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)
    queries, keys = (repeat_to_value_heads(x, value_heads) for x in (q, k))

    def recurrence(state, token):
        q_t, k_t, v_t, a_t, b_t, log_g_t = token
        return _recurrence(q_t * scale, k_t, v_t, a_t, b_t, log_g_t, state)

    tokens = tuple(map(time_major, (queries, keys, v, a, b, log_g)))
    out, final_state = scan_packed_rows(recurrence, initial_state, tokens, segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
