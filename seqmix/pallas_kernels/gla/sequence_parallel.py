"""Sequence parallelism for `chunk_gla` (LASP-2 style): the sequence is split over a mesh axis,
each device runs the chunked op on its shard from a zero state, the devices exchange one
fixed-size summary per shard (one all-gather, independent of T), and each corrects its own
outputs with the state that flows in from the shards before it.

Why a correction suffices: the op is linear in its initial state. A shard's true outputs are its
zero-state outputs plus, for the tokens of its first segment, scale * (q_t * exp(A_t)) S_in,
where A_t sums the log gates of those tokens up to t and S_in is the state carried in. S_in
follows from the summaries by a short scan over shards (the same on every device): a shard's end
state is its local final state, plus exp(A_total) S_in when the shard holds one segment only; the
next shard takes it when its first segment continues the one that ended there. Segments may span
any number of shards; padding neither reads nor changes the state; `initial_state` enters the
row's first segment, as in `chunk_gla`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from seqmix.pallas_kernels.gla.op import chunk_gla
from seqmix.pallas_kernels.gla.reference import log_gate_of


SEQUENCE_AXIS = "sequence"  # the mesh axis that splits sequences (seqmix.train.sharding's too)


def splits_sequence(mesh, length: int) -> bool:
    """Whether `chunk_gla` over T = `length` tokens runs sequence-parallel under `mesh` (an
    abstract mesh): its sequence axis has several devices, divides T, and is not already manual
    (inside this op's own shard_map)."""
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return False
    size = mesh.shape[SEQUENCE_AXIS]
    manual = mesh.axis_types[mesh.axis_names.index(SEQUENCE_AXIS)] == AxisType.Manual
    return size > 1 and not manual and length % size == 0


def sequence_parallel_gla(q, k, v, *, mesh: Mesh | AbstractMesh, axis: str = SEQUENCE_AXIS, log_g=None, log_a=None,
                          scale=None, initial_state=None, segment_ids=None, output_final_state=False, chunk_size=64,
                          impl="auto"):
    """`chunk_gla` (same arguments, shapes and results) with T split over the mesh axis `axis`;
    T must be a multiple of that axis' size. Each device holds [B, T / n, ...] of every [B, T, ...]
    input and output; the final state [B, H, K, V] float32 is replicated over `axis`. Only `axis`
    is manual inside: the other mesh axes (batch, heads) stay sharded as XLA places them."""
    shards = mesh.shape[axis]
    batch, length, heads, key_dim = q.shape
    if length % shards:
        raise ValueError(f"sequence_parallel_gla: T={length} is not a multiple of the {shards} devices of mesh "
                         f"axis {axis!r}")
    if log_g is not None and log_a is not None:
        raise ValueError("sequence_parallel_gla: pass log_g (per-key decay) or log_a (per-head decay), not both")
    gate = log_gate_of(log_g, log_a, q.shape[:3])  # [B, T, H, K or 1]
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
    body = functools.partial(_shard, axis=axis, per_key=log_g is not None, chunk_size=chunk_size, impl=impl,
                             scale=key_dim ** -0.5 if scale is None else scale)
    split = PartitionSpec(None, axis)
    # The final state comes from the all-gathered summaries, equal on every device, though JAX's
    # varying-axis check cannot tell: it would refuse the replicated out_spec.
    out, final_state = jax.shard_map(body, mesh=mesh, in_specs=(split,) * 5 + (PartitionSpec(),),
                                     out_specs=(split, PartitionSpec()), axis_names={axis}, check_vma=False)(
        q, k, v, gate, segment_ids, initial_state.astype(jnp.float32))
    return (out, final_state) if output_final_state else out


def _shard(q, k, v, gate, segment_ids, initial_state, *, axis, per_key, chunk_size, impl, scale):
    """One device's part: q, k [B, t, H, K], v [B, t, H, V], gate [B, t, H, K or 1], segment_ids
    [B, t] of its shard; initial_state [B, H, K, V]. Returns (o [B, t, H, V], final state)."""
    gates = dict(log_g=gate) if per_key else dict(log_a=gate[..., 0])
    out, local_final = chunk_gla(q, k, v, **gates, scale=scale, segment_ids=segment_ids, output_final_state=True,
                                 chunk_size=chunk_size, impl=impl)
    real = segment_ids != 0
    has_real = jnp.any(real, axis=1)
    first = jnp.take_along_axis(segment_ids, jnp.argmax(real, axis=1)[:, None], axis=1)[:, 0]
    last = jnp.take_along_axis(segment_ids, (real.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1))[:, None],
                               axis=1)[:, 0]
    other = real & (segment_ids != first[:, None])  # a real token of a later segment
    first_run = real & (jnp.cumsum(other, axis=1) == 0)  # the shard's first segment
    log_decay = jnp.cumsum(jnp.where(first_run[..., None, None], gate, 0.0), axis=1)  # A_t [B, t, H, K or 1]
    summary = (local_final, log_decay[:, -1], first, last, has_real, ~jnp.any(other, axis=1))
    states_in, final_state = _carry(jax.lax.all_gather(summary, axis), initial_state)
    state_in = states_in[jax.lax.axis_index(axis)]
    carried = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float32) * jnp.exp(log_decay), state_in)
    out = out.astype(jnp.float32) + scale * jnp.where(first_run[..., None, None], carried, 0.0)
    return out.astype(q.dtype), final_state


def _carry(summaries, initial_state):
    """(the state entering each shard [n, B, H, K, V], the row's final state [B, H, K, V]) from the
    all-gathered per-shard summaries (each with a leading shard axis n)."""
    def step(carry, shard):
        state, segment, before_first = carry  # before_first: no real token yet (initial_state pending)
        local_final, log_decay, first, last, has_real, single_segment = shard
        continues = has_real & (before_first | ((first == segment) & (segment != 0)))
        state_in = jnp.where(continues[:, None, None, None], state, 0.0)
        end = local_final + jnp.where(single_segment[:, None, None, None],
                                      jnp.exp(log_decay)[..., None] * state_in, 0.0)
        carry = (jnp.where(has_real[:, None, None, None], end, state), jnp.where(has_real, last, segment),
                 before_first & ~has_real)
        return carry, state_in

    batch = initial_state.shape[0]
    start = (initial_state, jnp.zeros((batch,), summaries[2].dtype), jnp.ones((batch,), bool))
    (final_state, _, _), states_in = jax.lax.scan(step, start, summaries)
    return states_in, final_state
