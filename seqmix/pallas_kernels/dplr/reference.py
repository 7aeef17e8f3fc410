"""The oracle: the DPLR generalized delta rule token by token (`lax.scan`, float32), the recurrence
of `dplr.step` over a whole sequence (read that module for the rule).

Packed rows follow `segments.scan_packed_rows`; grouped value heads `grouped_heads`.
"""

import jax.numpy as jnp

from seqmix.pallas_kernels.dplr.step import recurrence
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


def dplr_reference(q, k, v, *, a, b, log_g, scale, initial_state, segment_ids, chunk_size=None):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; a, b, log_g [B,T,Hv,K] float32; initial_state [B,Hv,K,V] or
    None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state [B,Hv,K,V]
    float32). `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    batch, _, value_heads, value_dim = v.shape
    initial_state = initial_state_or_zeros(initial_state, batch, value_heads, q.shape[-1], value_dim)
    time_major = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)
    queries, keys = (repeat_to_value_heads(x, value_heads) for x in (q, k))

    def token_step(state, token):
        q_t, k_t, v_t, a_t, b_t, log_g_t = token
        return recurrence(q_t * scale, k_t, v_t, a_t, b_t, log_g_t, state)

    tokens = tuple(map(time_major, (queries, keys, v, a, b, log_g)))
    out, final_state = scan_packed_rows(token_step, initial_state, tokens, segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
