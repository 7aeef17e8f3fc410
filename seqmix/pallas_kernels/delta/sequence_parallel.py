"""Sequence-parallel `chunk_delta_rule` (LASP-2; the shared machinery is
`pallas_kernels.sequence_parallel`).

The delta rule's transition is a [K, K] matrix per token, (I - beta_t k_t k_t^T) Diag(a_t), so a shard
passes an entering state on multiplied by the product P of its first segment's transitions; the
op itself computes P and the correction (`sequence_parallel.shard_by_matrix_transitions`).
"""

from __future__ import annotations

import functools

from jax.sharding import AbstractMesh, Mesh

from seqmix.pallas_kernels.delta.local import local_delta_rule
from seqmix.pallas_kernels.log_gates import log_gate_of
from seqmix.pallas_kernels.sequence_parallel import SEQUENCE_AXIS, run_sharded, shard_by_matrix_transitions


def sequence_parallel_delta_rule(q, k, v, beta, *, mesh: Mesh | AbstractMesh, axis: str = SEQUENCE_AXIS, log_a=None,
                                 log_g=None, scale=None, initial_state=None, segment_ids=None,
                                 output_final_state=False, chunk_size=64, impl="auto"):
    """`chunk_delta_rule` (same arguments, shapes and results) with T split over the mesh axis
    `axis`, which must divide T. Each device holds [B, T / n, ...] of every [B, T, ...] input and
    output; the final state [B, H, K, V] float32 is replicated over `axis`. `chunk_delta_rule`
    checks the arguments and calls this by itself under such a mesh."""
    log_gate = log_gate_of(log_g, log_a, beta.shape)
    body = functools.partial(_shard, axis=axis, chunk_size=chunk_size, impl=impl,
                             scale=q.shape[-1] ** -0.5 if scale is None else scale)
    out, final_state = run_sharded("sequence_parallel_delta_rule", body, mesh, axis, (q, k, v, beta, log_gate),
                                   segment_ids, initial_state)
    return (out, final_state) if output_final_state else out


def _shard(q, k, v, beta, log_gate, segment_ids, initial_state, *, axis, chunk_size, impl, scale):
    """One device's part: q, k [B, t, Hk, K], v [B, t, H, V], beta [B, t, H], log_gate [B, t, H, W],
    segment_ids [B, t] of its shard; initial_state [B, H, K, V]. Returns (o [B, t, H, V], final
    state)."""
    scan = functools.partial(local_delta_rule, q, k, beta=beta, log_gate=log_gate, scale=scale,
                             segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    return shard_by_matrix_transitions(axis, scan, v, k.shape[-1], segment_ids, initial_state, q.dtype)
