"""Sequence-parallel `chunk_gla` and `chunk_delta_rule` over 8 devices against the single-device
ops: outputs, final state and gradients, with segments that start mid-shard and span several
shards, a shard of padding only, an initial state, and each family's gates; and the ops going
sequence-parallel by themselves under a mesh, with communication that does not grow with T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels.delta import chunk_delta_rule, sequence_parallel_delta_rule
from seqmix.pallas_kernels.dplr import chunk_dplr, sequence_parallel_dplr
from seqmix.pallas_kernels.gla import chunk_gla, sequence_parallel_gla
from seqmix.train.compile_check import collective_bytes

pytestmark = pytest.mark.eight_devices

SHARDS, SHARD_LEN = 8, 20  # T = 160; shards of 20 tokens, chunks of 16: a partial chunk per shard
B, H, K, V = 3, 2, 8, 4
OPS = {"gla": (chunk_gla, sequence_parallel_gla), "delta": (chunk_delta_rule, sequence_parallel_delta_rule),
       "dplr": (chunk_dplr, sequence_parallel_dplr)}


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def dplr_gates(key, length):
    """RWKV-7-like a = -kappa_hat, b = alpha * kappa_hat (a stable transition) and a per-key decay."""
    first, second, third = jax.random.split(key, 3)
    kappa = jax.random.normal(first, (B, length, H, K))
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    alpha = jax.nn.sigmoid(jax.random.normal(second, (B, length, H, K)))
    decay = jax.nn.log_sigmoid(3 + jax.random.normal(third, (B, length, H, K)))
    return {"a": -kappa, "b": alpha * kappa, "log_g": decay}


def gates_of(case, key, length):
    """The gate keywords of each case: GLA's per-key, per-head or no decay; the delta rule's beta
    with or without a decay, and beta in (0, 2) (negative eigenvalues)."""
    first, second = jax.random.split(key)
    decay = lambda shape: jax.nn.log_sigmoid(3 + jax.random.normal(first, shape))
    beta = jax.nn.sigmoid(jax.random.normal(second, (B, length, H)))
    return {"gla_per_key": {"log_g": decay((B, length, H, K))}, "gla_per_head": {"log_a": decay((B, length, H))},
            "gla_none": {}, "delta_gated": {"beta": beta, "log_a": decay((B, length, H))},
            "delta_negative_eigenvalues": {"beta": 2 * beta},
            "delta_grouped_per_key": {"beta": beta, "log_g": decay((B, length, H, K))},
            "dplr": dplr_gates(key, length), "dplr_grouped": dplr_gates(key, length)}[case]


def inputs(case):
    keys = iter(jax.random.split(jax.random.key(0), 6))
    length = SHARDS * SHARD_LEN
    q, k = (jax.random.normal(next(keys), (B, length, H, K)) for _ in range(2))
    if case.startswith("delta"):  # the delta rule expects L2-normalised keys
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    if "grouped" in case:  # one q/k head read by the H value heads
        q, k = q[:, :, :1], k[:, :, :1]
    v = jax.random.normal(next(keys), (B, length, H, V))
    segment_ids = jnp.array([
        [1] * length,                                      # one document across every shard
        [1] * 37 + [2] * 50 + [3] * 3 + [4] * 57 + [5] * 13,  # starts mid-shard, spans shards, short ones
        [1] * 45 + [0] * 20 + [2] * 75 + [0] * 20,         # shard 2 is pure padding; padding at the end
    ])
    initial_state = jax.random.normal(next(keys), (B, H, K, V))
    return q, k, v, gates_of(case, next(keys), length), segment_ids, initial_state


@pytest.mark.parametrize("case", ["gla_per_key", "gla_per_head", "gla_none", "delta_gated",
                                  "delta_negative_eigenvalues", "delta_grouped_per_key", "dplr",
                                  "dplr_grouped"])
def test_sequence_parallel_equals_the_single_device_op(case):
    mesh = jax.make_mesh((SHARDS,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    single_op, parallel_op = OPS[case.split("_")[0]]
    q, k, v, gates, segment_ids, initial_state = inputs(case)
    probe_o = jax.random.normal(jax.random.key(7), v.shape)
    probe_s = jax.random.normal(jax.random.key(8), initial_state.shape)

    def run(op, q, k, v, gates, initial_state):
        out, final = op(q, k, v, **gates, initial_state=initial_state, segment_ids=segment_ids,
                        output_final_state=True, chunk_size=16)
        return jnp.sum(out * probe_o) + jnp.sum(final * probe_s), (out, final)

    single = jax.jit(jax.value_and_grad(lambda *a: run(single_op, *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
    parallel = jax.jit(jax.value_and_grad(
        lambda *a: run(jax.tree_util.Partial(parallel_op, mesh=mesh), *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
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
    with pytest.raises(ValueError, match="sequence_parallel_delta_rule: T=20 is not a multiple"):
        sequence_parallel_delta_rule(q, q, q, q[..., 0], mesh=mesh)


@pytest.mark.parametrize("family", ["gla", "delta", "dplr"])
def test_the_ops_under_a_sequence_mesh_gather_summaries_whose_size_does_not_grow_with_t(family):
    """Traced with a mesh whose sequence axis has 8 devices ambient (as the train step traces),
    each op runs sequence-parallel: the same output, and its collectives move the 8 per-shard
    summaries (states [B, H, K, V], the delta rule's transitions [B, H, K, K], a few [B]-sized
    fields), the same bytes at T = 160 and 320."""
    mesh = jax.make_mesh((SHARDS,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    op = OPS[family][0]
    gathered = {}
    for length in (SHARDS * SHARD_LEN, 2 * SHARDS * SHARD_LEN):
        q = jax.random.normal(jax.random.key(length), (B, length, H, K))
        k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        gate = jax.nn.sigmoid(q[..., 0]) if family == "delta" else jax.nn.log_sigmoid(3 + q)
        segment_ids = jnp.ones((B, length), jnp.int32)

        def call(k, gate):
            gates = {"gla": {"log_g": gate}, "delta": {"beta": gate},
                     "dplr": {"a": -k, "b": 0.5 * k, "log_g": gate}}[family]
            return op(k, k, k[..., :V], **gates, segment_ids=segment_ids, chunk_size=16)

        def under_mesh(k, gate):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return call(k, gate)

        # The train step's arguments carry the concrete mesh like this (its in_shardings).
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
        compiled = jax.jit(under_mesh, in_shardings=(split, split)).lower(k, gate).compile()
        assert rel_err(compiled(k, gate), call(k, gate)) < 1e-5
        gathered[length] = collective_bytes(compiled.as_text())
    summary_bytes = SHARDS * B * H * K * (V + (0 if family == "gla" else K)) * 4
    assert gathered[160] == gathered[320], gathered
    assert summary_bytes <= sum(gathered[160].values()) < 1.5 * summary_bytes, (gathered, summary_bytes)
