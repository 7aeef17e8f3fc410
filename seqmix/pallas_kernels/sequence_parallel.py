"""Sequence parallelism for the chunked scans (LASP-2 style), what the families share.

The sequence is split over a mesh axis; each device runs its family's chunked op on its shard
from a zero state, the devices exchange one fixed-size summary per shard (one all-gather,
independent of T), and each corrects its own outputs with the state that flows in from the
shards before it. Both families' scans are affine in the state (S_t = A_t S_{t-1} + B_t), so a
shard's end state is its local final state plus its transition applied to the state that entered
it, and a short scan over the gathered summaries (the same on every device) gives every shard's
entering state. A shard passes a state on only within one segment: the next shard takes it when
its first segment continues the one the state belongs to; padding neither reads nor changes
it; the op's `initial_state` enters the row's first segment, as in the single-device ops.

The family modules (`gla/sequence_parallel.py`, `delta/sequence_parallel.py`) supply the shard
body: the local scan, the shard's transition, and the correction of its outputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

SEQUENCE_AXIS = "sequence"  # the mesh axis that splits sequences (seqmix.train.sharding's too)


def splits_sequence(mesh, length: int) -> bool:
    """Whether a scan over T = `length` tokens runs sequence-parallel under `mesh` (an abstract
    mesh, possibly empty): its sequence axis has several devices, divides T, and is not already
    manual (inside the sequence-parallel op's own shard_map)."""
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return False
    size = mesh.shape[SEQUENCE_AXIS]
    manual = mesh.axis_types[mesh.axis_names.index(SEQUENCE_AXIS)] == AxisType.Manual
    return size > 1 and not manual and length % size == 0


def run_sharded(op: str, body, mesh, axis: str, sequences: tuple, segment_ids, initial_state):
    """Runs body(*sequences, segment_ids, initial_state) -> (o, final_state) on every device's
    shard of the [B, T, ...] arrays `sequences` (q, k, v [B, T, H, V], then the family's gates) and
    segment_ids [B, T] (None: one segment per row), T split over `axis`, which must divide it;
    initial_state [B, H, K, V] (v's heads) or None (zeros). Returns o [B, T, ...] and the final state,
    replicated. Only `axis` is manual inside: the other mesh axes (batch, heads) stay sharded as
    XLA places them."""
    (batch, length, _, key_dim), (heads, value_dim) = sequences[0].shape, sequences[2].shape[2:]
    shards = mesh.shape[axis]
    if length % shards:
        raise ValueError(f"{op}: T={length} is not a multiple of the {shards} devices of mesh axis {axis!r}")
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    split = PartitionSpec(None, axis)
    # The final state comes from the all-gathered summaries, equal on every device, though JAX's
    # varying-axis check cannot tell: it would refuse the replicated out_spec.
    return jax.shard_map(body, mesh=mesh, in_specs=(split,) * (len(sequences) + 1) + (PartitionSpec(),),
                         out_specs=(split, PartitionSpec()), axis_names={axis}, check_vma=False)(
        *sequences, segment_ids, initial_state.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class ShardSegments:
    """A shard's segment structure, per row: first, last [B] (segment ids of its first and last
    real tokens), has_real [B], first_run [B, t] (the tokens of its first segment) and
    single_segment [B] (no other segment starts in it)."""

    first: jax.Array
    last: jax.Array
    has_real: jax.Array
    first_run: jax.Array
    single_segment: jax.Array


def shard_segments(segment_ids) -> ShardSegments:
    """The segment structure of one shard's segment_ids [B, t] (0 = padding)."""
    real = segment_ids != 0
    first = jnp.take_along_axis(segment_ids, jnp.argmax(real, axis=1)[:, None], axis=1)[:, 0]
    last = jnp.take_along_axis(segment_ids, (real.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1))[:, None],
                               axis=1)[:, 0]
    other = real & (segment_ids != first[:, None])  # a real token of a later segment
    return ShardSegments(first, last, jnp.any(real, axis=1), real & (jnp.cumsum(other, axis=1) == 0),
                         ~jnp.any(other, axis=1))


def entering_state(axis: str, local_final, transition, segments: ShardSegments, initial_state, propagate):
    """(the state entering this device's shard, the row's final state), both [B, H, K, V] float32.

    local_final: this shard's final state from a zero start; transition: a pytree of arrays that
    `propagate(transition, state) -> [B, H, K, V]` applies to a state entering the shard to give
    its part of the shard's end state (zero when another segment starts inside the shard). One
    all-gather over `axis` of (local_final, transition, segment ids) is all the communication."""
    summaries = jax.lax.all_gather(
        (local_final, transition, segments.first, segments.last, segments.has_real), axis)

    def step(carry, shard):
        state, segment, before_first = carry  # before_first: no real token yet (initial_state pending)
        final, shard_transition, first, last, has_real = shard
        continues = has_real & (before_first | ((first == segment) & (segment != 0)))
        state_in = jnp.where(continues[:, None, None, None], state, 0.0)
        end = final + propagate(shard_transition, state_in)
        carry = (jnp.where(has_real[:, None, None, None], end, state), jnp.where(has_real, last, segment),
                 before_first & ~has_real)
        return carry, state_in

    batch = initial_state.shape[0]
    start = (initial_state, jnp.zeros((batch,), segments.first.dtype), jnp.ones((batch,), bool))
    (final_state, _, _), states_in = jax.lax.scan(step, start, summaries)
    return states_in[jax.lax.axis_index(axis)], final_state


def shard_by_matrix_transitions(axis: str, scan, v, key_dim: int, segment_ids, initial_state, dtype):
    """One device's part for a family whose per-token transition is a [K, K] matrix (the delta
    rules, DPLR): the op itself gives the shard's transition and its correction.

    scan(values, initial_state) -> (o, final_state) runs the family's local op on this shard with
    everything but v and the entering state bound. Scanning with zero values from the identity
    gives the product P of the first segment's transitions as the final state; scanning with zero
    values from the entering state S_in gives exactly the outputs S_in contributes. Three scans per
    shard; the all-gather carries [B, H, K, V] states and [B, H, K, K] transitions, independent of T.
    v [B, t, H, V]; segment_ids [B, t]; initial_state [B, H, K, V]. Returns (o [B, t, H, V] in
    dtype, the row's final state)."""
    out, local_final = scan(v, initial_state=None)
    batch, length, heads = v.shape[:3]
    identity = jnp.broadcast_to(jnp.eye(key_dim, dtype=jnp.float32), (batch, heads, key_dim, key_dim))
    _, transition = scan(jnp.zeros((batch, length, heads, key_dim), v.dtype), initial_state=identity)
    state_in, final_state = entering_state(axis, local_final, transition, shard_segments(segment_ids), initial_state,
                                           lambda product, state: jnp.einsum("bhkl,bhlv->bhkv", product, state))
    carried, _ = scan(jnp.zeros_like(v), initial_state=state_in)
    return (out.astype(jnp.float32) + carried.astype(jnp.float32)).astype(dtype), final_state
