"""One token of the (gated) delta rule: the recurrence that the decode step applies and that the
token-by-token oracle (`delta.reference`) scans.

    S'_t = Diag(exp(log_gate_t)) S_{t-1}                           S [K, V]
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  = (I - beta_t k_t k_t^T) S'_t + beta_t k_t v_t^T
    o_t  = S_t^T (scale * q_t)

log_gate_t is one log decay per head (Gated DeltaNet's log_a, broadcast over the keys), one per key
(KDA's log_g), or zero (DeltaNet). In the [K, V] orientation the Householder-like factor multiplies
from the left; the second form of S_t is the "delta": the state moves its prediction for key k_t
towards v_t by beta_t.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.log_gates import log_gate_of


def recurrence(q, k, v, beta, log_gate, state):
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
    out, state = recurrence(f32(q) * scale, f32(k), v.astype(jnp.float32), beta.astype(jnp.float32),
                            log_gate_of(log_g, log_a, beta.shape), state)
    return out.astype(q.dtype), state
