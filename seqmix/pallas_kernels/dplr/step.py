"""One token of the DPLR generalized delta rule: the recurrence that the decode step applies and
that the token-by-token oracle (`dplr.reference`) scans.

    S_t = Diag(exp(log_g_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        S [K, V]
    o_t = S_t^T (scale * q_t)

The transition Diag(exp(log_g_t)) + b_t a_t^T is diagonal plus rank one; a_t reads the previous,
undecayed state (fla's `chunk_dplr_delta_rule` convention).
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads


def recurrence(q, k, v, a, b, log_g, state):
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
    out, state = recurrence(by_value_head(q) * scale, by_value_head(k), f32(v), f32(a), f32(b), f32(log_g),
                            state.astype(jnp.float32))
    return out.astype(q.dtype), state
