"""Attention with the sequence split over the mesh (`sequence_parallel_attention`): each device's
queries in blocks against the all-gathered keys and values, equal to the layer on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.mixers import attention
from seqmix.mixers.attention import Attention, AttentionConfig
from seqmix.models.config import ModelConfig

pytestmark = pytest.mark.eight_devices

LENGTH = 1024  # 4 sequence shards of one 256-token block each


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("window, causal", [(None, True), (300, True), (None, False)])
def test_the_layer_split_over_the_sequence_equals_it_on_one_device_in_a_fraction_of_the_memory(monkeypatch, window,
                                                                                               causal):
    """data 2 x sequence 4: outputs and the gradients of the input and of every weight equal the
    layer's on one device, for packed rows whose documents and padding cross the shards (a shard
    of pure padding, a window reaching into the shard before); and the compiled step keeps under
    half the temporaries of the same layer left to XLA's partitioning of the dense form."""
    layer = Attention(build(ModelConfig, {"d_model": 32, "n_heads": 4, "n_kv_heads": 2}, "model"),
                      AttentionConfig(sliding_window=window, causal=causal), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, 32))
    segment_ids = jnp.asarray([[1] * 300 + [2] * 420 + [0] * 304,
                               [1] * 200 + [0] * 312 + [2] * 256 + [3] * 256], jnp.int32)
    real = (segment_ids != 0)[..., None]
    probe = jax.random.normal(jax.random.key(2), x.shape) * real

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, segment_ids=segment_ids)[0] * probe)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    expected_loss, expected_grads = step(params, x)
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        assert attention.splits_sequence_in_blocks(jax.sharding.get_abstract_mesh(), LENGTH)
        split_step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        split = split_step.lower(params, x).compile()
        split_loss, split_grads = split(params, x)
        monkeypatch.setattr(attention, "BLOCKWISE_FROM", 10**9)  # the dense form, partitioned by XLA
        dense = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    assert float(split_loss) == pytest.approx(float(expected_loss), rel=1e-5)
    for got, want in zip(jax.tree.leaves(split_grads), jax.tree.leaves(expected_grads), strict=True):
        assert rel_err(got, want) < 1e-4
    split_bytes, dense_bytes = (c.memory_analysis().temp_size_in_bytes for c in (split, dense))
    assert split_bytes < 0.5 * dense_bytes, (split_bytes, dense_bytes)
