"""Sequence-parallel `chunk_gla` (LASP-2; the shared machinery is `pallas_kernels.sequence_parallel`).

The gated scan's transition is diagonal: a shard passes an entering state on scaled by the
product of its first segment's gates, exp(A) per key, and a token t of that first segment reads
it as scale * (q_t * exp(A_t)) S_in, with A_t the sum of the log gates up to t. So the correction
needs no second scan, and the all-gather carries [B, H, K, V] states and [B, H, K] decays.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from seqmix.pallas_kernels.gla.local import local_gla
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.log_gates import log_gate_of
from seqmix.pallas_kernels.sequence_parallel import SEQUENCE_AXIS, entering_state, run_sharded, shard_segments


def sequence_parallel_gla(q, k, v, *, mesh: Mesh | AbstractMesh, axis: str = SEQUENCE_AXIS, log_g=None, log_a=None,
                          scale=None, initial_state=None, segment_ids=None, output_final_state=False, chunk_size=64,
                          impl="auto"):
    """`chunk_gla` (same arguments, shapes and results) with T split over the mesh axis `axis`,
    which must divide T. Each device holds [B, T / n, ...] of every [B, T, ...] input and output;
    the final state [B, H, K, V] float32 is replicated over `axis`. `chunk_gla` checks the
    arguments and calls this by itself under such a mesh."""
    gate = log_gate_of(log_g, log_a, v.shape[:3])  # [B, T, H, K or 1]
    body = functools.partial(_shard, axis=axis, chunk_size=chunk_size, impl=impl,
                             scale=q.shape[-1] ** -0.5 if scale is None else scale)
    out, final_state = run_sharded("sequence_parallel_gla", body, mesh, axis, (q, k, v, gate), segment_ids,
                                   initial_state)
    return (out, final_state) if output_final_state else out


def _shard(q, k, v, gate, segment_ids, initial_state, *, axis, chunk_size, impl, scale):
    """One device's part: q, k [B, t, Hk, K], v [B, t, H, V], gate [B, t, H, K or 1], segment_ids
    [B, t] of its shard; initial_state [B, H, K, V]. Returns (o [B, t, H, V], final state)."""
    out, local_final = local_gla(q, k, v, gate, scale=scale, initial_state=None, segment_ids=segment_ids,
                                 chunk_size=chunk_size, impl=impl)
    segments = shard_segments(segment_ids)
    log_decay = jnp.cumsum(jnp.where(segments.first_run[..., None, None], gate, 0.0), axis=1)  # A_t
    transition = (log_decay[:, -1], segments.single_segment)
    state_in, final_state = entering_state(axis, local_final, transition, segments, initial_state, _propagate)
    q = repeat_to_value_heads(q.astype(jnp.float32), v.shape[2])
    carried = jnp.einsum("bthk,bhkv->bthv", q * jnp.exp(log_decay), state_in)
    out = out.astype(jnp.float32) + scale * jnp.where(segments.first_run[..., None, None], carried, 0.0)
    return out.astype(q.dtype), final_state


def _propagate(transition, state):
    """A state entering a shard, at the shard's end: scaled by its first segment's decay [B, H, K
    or 1], or gone when another segment starts in the shard."""
    log_decay, single_segment = transition
    return jnp.where(single_segment[:, None, None, None], jnp.exp(log_decay)[..., None] * state, 0.0)
