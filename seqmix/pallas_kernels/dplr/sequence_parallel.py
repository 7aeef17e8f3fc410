"""Sequence-parallel `chunk_dplr` (LASP-2; the shared machinery is `pallas_kernels.sequence_parallel`).

The DPLR transition is a [K, K] matrix per token, Diag(exp(log_g_t)) + b_t a_t^T, so a shard
passes an entering state on multiplied by the product P of its first segment's transitions; as
for the delta rule, the op itself computes P and the correction
(`sequence_parallel.shard_by_matrix_transitions`).
"""

from __future__ import annotations

import functools

from jax.sharding import AbstractMesh, Mesh

from seqmix.pallas_kernels.dplr.local import local_dplr
from seqmix.pallas_kernels.sequence_parallel import SEQUENCE_AXIS, run_sharded, shard_by_matrix_transitions


def sequence_parallel_dplr(q, k, v, a, b, *, mesh: Mesh | AbstractMesh, log_g, axis: str = SEQUENCE_AXIS, scale=None,
                           initial_state=None, segment_ids=None, output_final_state=False, chunk_size=64,
                           impl="auto"):
    """`chunk_dplr` (same arguments, shapes and results) with T split over the mesh axis `axis`,
    which must divide T. Each device holds [B, T / n, ...] of every [B, T, ...] input and output;
    the final state [B, H, K, V] float32 is replicated over `axis`. `chunk_dplr` checks the
    arguments and calls this by itself under such a mesh."""
    body = functools.partial(_shard, axis=axis, chunk_size=chunk_size, impl=impl,
                             scale=q.shape[-1] ** -0.5 if scale is None else scale)
    out, final_state = run_sharded("sequence_parallel_dplr", body, mesh, axis, (q, k, v, a, b, log_g), segment_ids,
                                   initial_state)
    return (out, final_state) if output_final_state else out


def _shard(q, k, v, a, b, log_g, segment_ids, initial_state, *, axis, chunk_size, impl, scale):
    """One device's part: q, k [B, t, Hk, K], v [B, t, H, V], a, b, log_g [B, t, H, K], segment_ids
    [B, t] of its shard; initial_state [B, H, K, V]. Returns (o [B, t, H, V], final state)."""
    scan = functools.partial(local_dplr, q, k, a=a, b=b, log_g=log_g, scale=scale, segment_ids=segment_ids,
                             chunk_size=chunk_size, impl=impl)
    return shard_by_matrix_transitions(axis, scan, v, k.shape[-1], segment_ids, initial_state, q.dtype)
