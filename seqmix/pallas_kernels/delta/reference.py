"""The oracle: the (gated) delta rule token by token (`lax.scan`, float32), the recurrence of
`delta.step` over a whole sequence (read that module for the rule).

Packed rows follow `segments.scan_packed_rows`; grouped value heads `grouped_heads`.
"""

import jax.numpy as jnp

from seqmix.pallas_kernels.delta.step import recurrence
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import initial_state_or_zeros, scan_packed_rows


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

    def token_step(state, token):
        q_t, k_t, v_t, beta_t, gate_t = token
        return recurrence(q_t * scale, k_t, v_t, beta_t, gate_t, state)

    tokens = tuple(map(time_major, (q, k, v, beta, log_gate)))
    out, final_state = scan_packed_rows(token_step, initial_state, tokens, segment_ids)
    return jnp.swapaxes(out, 0, 1).astype(q.dtype), final_state
