"""Chunked gated linear attention in plain jnp: every chunk's own part at once, then a scan over
chunk states. O(T C (K + V)) work with T/C sequential steps; JAX differentiates it."""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.gla import chunk_math, layout


def gla_xla(q, k, v, *, log_gate, scale, initial_state, segment_ids, chunk_size):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    x = layout.to_chunks(q, k, v, log_gate, scale, segment_ids, chunk_size)
    dtype = layout.matmul_dtype(q.dtype)
    chunks = x.q.shape[2] // chunk_size

    def by_chunk(a):  # [B,H,Tp,D] -> [B,H,N,C,D]
        return a.reshape(a.shape[:2] + (chunks, chunk_size, a.shape[-1]))

    q_c, k_c, v_c, g_c = map(by_chunk, (x.q, x.k, x.v, x.log_gate))
    groups = x.groups.reshape(batch, 1, chunks, chunk_size, 1)  # broadcast over heads

    def over_chunks(fn, *args):
        # vmap over N, then H, then B; groups carry a head axis of size 1 and broadcast.
        mapped = fn
        for _ in range(3):
            mapped = jax.vmap(mapped)
        args = [jnp.broadcast_to(a, (batch, heads) + a.shape[2:]) for a in args]
        return mapped(*args)

    gates = over_chunks(chunk_math.cumulative_gates, g_c)
    intra = over_chunks(lambda *a: chunk_math.intra_chunk(*a, dtype), q_c, k_c, v_c, gates, groups)
    decay, update = over_chunks(lambda *a: chunk_math.state_transition(*a, dtype), k_c, v_c, g_c, gates, groups)

    def carry(state, transition):
        chunk_decay, chunk_update = transition
        return chunk_decay * state + chunk_update, state

    state0 = layout.state_in(initial_state, batch, heads, key_dim, value_dim)
    final, incoming = lax.scan(carry, state0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(update, 2, 0)))
    incoming = jnp.moveaxis(incoming, 0, 2)
    inter = over_chunks(lambda *a: chunk_math.inter_chunk(*a, dtype), q_c, gates, groups, incoming)
    out = (intra + inter).reshape(batch, heads, chunks * chunk_size, value_dim)
    return layout.from_chunks(out, length, q.dtype), layout.state_out(final)
