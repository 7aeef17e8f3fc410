"""The oracle: gated linear attention token by token (`lax.scan`, float32), the recurrence of
`gla.step` over a whole sequence.

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t v_t^T        S [K, V]
    o_t = S_t^T (scale * q_t)

Packed rows follow `segments.scan_packed_rows`: padding leaves the state as it is and outputs
zeros, the state resets where a segment starts; `initial_state` is the state before the row's
first token. Grouped value heads follow `grouped_heads`.
"""

import jax.numpy as jnp

from seqmix.pallas_kernels.gla.step import recurrence
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


def gla_reference(q, k, v, *, log_gate, scale, initial_state, segment_ids, chunk_size=None):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; log_gate [B,T,Hv,W] float32 (W = K or 1); initial_state
    [B,Hv,K,V] or None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state
    [B,Hv,K,V] float32). `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    batch, _, heads, value_dim = v.shape
    key_dim = q.shape[-1]
    q, k = (repeat_to_value_heads(x, heads) for x in (q, k))
    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)  # time-major for the scan

    def token_step(state, token):
        q_t, k_t, v_t, gate_t = token
        return recurrence(q_t * scale, k_t, v_t, gate_t, state)

    state0 = initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim)
    out, final_state = scan_packed_rows(token_step, state0,
                                        (f32(q), f32(k), f32(v), f32(log_gate)), segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
