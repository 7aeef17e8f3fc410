"""Sequence-parallel `chunk_gla` over 8 devices against the single-device op: outputs, final state
and gradients, with segments that start mid-shard and span several shards, a shard of padding
only, an initial state, per-key and per-head decays and none; and `chunk_gla` itself going
sequence-parallel under a mesh, with communication that does not grow with T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels.gla import chunk_gla
from seqmix.pallas_kernels.gla.sequence_parallel import sequence_parallel_gla
from seqmix.train.compile_check import collective_bytes

SHARDS, SHARD_LEN = 8, 20  # T = 160; shards of 20 tokens, chunks of 16: a partial chunk per shard
B, H, K, V = 3, 2, 8, 4


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def inputs(decay):
    keys = iter(jax.random.split(jax.random.key(0), 6))
    length = SHARDS * SHARD_LEN
    q, k = (jax.random.normal(next(keys), (B, length, H, K)) for _ in range(2))
    v = jax.random.normal(next(keys), (B, length, H, V))
    gates = {"per_key": {"log_g": jax.nn.log_sigmoid(3 + jax.random.normal(next(keys), (B, length, H, K)))},
             "per_head": {"log_a": jax.nn.log_sigmoid(3 + jax.random.normal(next(keys), (B, length, H)))},
             "none": {}}[decay]
    segment_ids = jnp.array([
        [1] * length,                                      # one document across every shard
        [1] * 37 + [2] * 50 + [3] * 3 + [4] * 57 + [5] * 13,  # starts mid-shard, spans shards, short ones
        [1] * 45 + [0] * 20 + [2] * 75 + [0] * 20,         # shard 2 is pure padding; padding at the end
    ])
    initial_state = jax.random.normal(next(keys), (B, H, K, V))
    return q, k, v, gates, segment_ids, initial_state


@pytest.mark.parametrize("decay", ["per_key", "per_head", "none"])
def test_sequence_parallel_equals_the_single_device_op(decay):
    mesh = jax.make_mesh((SHARDS,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, gates, segment_ids, initial_state = inputs(decay)
    probe_o = jax.random.normal(jax.random.key(7), v.shape)
    probe_s = jax.random.normal(jax.random.key(8), initial_state.shape)

    def run(op, q, k, v, gates, initial_state):
        out, final = op(q, k, v, **gates, initial_state=initial_state, segment_ids=segment_ids,
                        output_final_state=True, chunk_size=16)
        return jnp.sum(out * probe_o) + jnp.sum(final * probe_s), (out, final)

    single = jax.jit(jax.value_and_grad(lambda *a: run(chunk_gla, *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
    parallel = jax.jit(jax.value_and_grad(
        lambda *a: run(jax.tree_util.Partial(sequence_parallel_gla, mesh=mesh), *a),
        argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, (out, final)), grads = single(q, k, v, gates, initial_state)
    (_, (sp_out, sp_final)), sp_grads = parallel(q, k, v, gates, initial_state)
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(sp_out)[real], np.asarray(out)[real]) < 1e-5
    assert rel_err(sp_final, final) < 1e-5
    for name, got, want in zip(["q", "k", "v", "gates", "initial_state"], sp_grads, grads):
        for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel_err(got_leaf, want_leaf) < 1e-4, name


def test_a_length_that_does_not_split_evenly_is_refused():
    mesh = jax.make_mesh((SHARDS,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    q = jnp.zeros((1, 20, 1, 4))
    with pytest.raises(ValueError, match="T=20 is not a multiple of the 8 devices of mesh axis 'sequence'"):
        sequence_parallel_gla(q, q, q, mesh=mesh)


def test_chunk_gla_under_a_sequence_mesh_gathers_states_whose_size_does_not_grow_with_t():
    """Traced with a mesh whose sequence axis has 8 devices ambient (as the train step traces),
    `chunk_gla` runs sequence-parallel: the same output, and its one collective is the all-gather
    of 8 per-shard summaries (states [B, H, K, V] and a few [B]-sized fields), equal at T = 160 and 320."""
    mesh = jax.make_mesh((SHARDS,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    gathered = {}
    for length in (SHARDS * SHARD_LEN, 2 * SHARDS * SHARD_LEN):
        q = jax.random.normal(jax.random.key(length), (B, length, H, K))
        log_g = jax.nn.log_sigmoid(3 + q)
        segment_ids = jnp.ones((B, length), jnp.int32)

        def under_mesh(q, log_g):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return chunk_gla(q, q, q[..., :V], log_g=log_g, segment_ids=segment_ids, chunk_size=16)

        # The train step's arguments carry the concrete mesh like this (its in_shardings).
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
        compiled = jax.jit(under_mesh, in_shardings=(split, split)).lower(q, log_g).compile()
        expected = chunk_gla(q, q, q[..., :V], log_g=log_g, segment_ids=segment_ids, chunk_size=16)
        assert rel_err(compiled(q, log_g), expected) < 1e-5
        gathered[length] = collective_bytes(compiled.as_text())
    state_bytes = SHARDS * B * H * K * V * 4
    assert gathered[160] == gathered[320], gathered
    assert state_bytes <= sum(gathered[160].values()) < 1.5 * state_bytes, (gathered, state_bytes)
