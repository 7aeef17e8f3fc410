"""One token of gated linear attention: the recurrence that the decode step applies and that the
token-by-token oracle (`gla.reference`) scans.

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t v_t^T        S [K, V]
    o_t = S_t^T (scale * q_t)
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.log_gates import log_gate_of


def recurrence(q, k, v, log_gate, state):
    """float32 q, k [B,H,K], v [B,H,V], log_gate [B,H,W], state [B,H,K,V] -> (o [B,H,V], state)."""
    state = jnp.exp(log_gate)[..., :, None] * state + k[..., :, None] * v[..., None, :]
    out = jnp.einsum("bhk,bhkv->bhv", q, state, precision=lax.Precision.HIGHEST)
    return out, state


def gla_step(q, k, v, state, *, log_g=None, log_a=None, scale=None):
    """One decode step for a batch of rows, with the semantics of `chunk_gla`.

    q, k [B,Hk,K]; v [B,Hv,V]; state [B,Hv,K,V] float32; log_g [B,Hv,K] or log_a [B,Hv] (or
    neither). Returns (o [B,Hv,V] in q.dtype, new state [B,Hv,K,V] float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: repeat_to_value_heads(x.astype(jnp.float32), v.shape[-2])
    out, state = recurrence(f32(q) * scale, f32(k), v.astype(jnp.float32), log_gate_of(log_g, log_a, v.shape[:-1]),
                            state)
    return out.astype(q.dtype), state
