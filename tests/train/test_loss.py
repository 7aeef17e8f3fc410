"""The blockwise cross-entropy against the plain one on full logits: value, gradients of the
features and the head, padding and a partial last block; and that it never holds [B, T, V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.train.loss import chunked_cross_entropy_sum, cross_entropy_sum


def plain(features, head, targets, mask):
    return cross_entropy_sum(features @ head, targets, mask)


def inputs(batch, length, dim, vocab, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    features = jax.random.normal(keys[0], (batch, length, dim))
    head = jax.random.normal(keys[1], (dim, vocab)) * 0.5
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
    mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 5]])[:batch]  # row 2 ends in padding
    return features, head, targets, mask


def test_value_and_gradients_equal_the_plain_loss():
    features, head, targets, mask = inputs(2, 23, 16, 300)  # 46 tokens: blocks of 8, the last partial
    chunked = lambda f, h: chunked_cross_entropy_sum(f, h, targets, mask, chunk_tokens=8)
    total, count = chunked(features, head)
    expected_total, expected_count = plain(features, head, targets, mask)
    np.testing.assert_allclose(total, expected_total, rtol=1e-6)
    assert float(count) == float(expected_count) == 41.0
    grads = jax.grad(lambda f, h: chunked(f, h)[0], (0, 1))(features, head)
    expected = jax.grad(lambda f, h: plain(f, h, targets, mask)[0], (0, 1))(features, head)
    for got, want in zip(grads, expected):
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
    assert float(jnp.abs(grads[0][1, -5:]).max()) == 0.0  # padding gets no gradient


def test_the_full_logits_are_never_held():
    """[2, 2048] tokens x 8192 vocabulary: full float32 logits are 128 MiB; blocks of 256 tokens
    keep the compiled fwd+bwd's temporaries at a few blocks' logits (8 MiB each)."""
    features, head, targets, mask = inputs(2, 2048, 32, 8192)
    full_bytes = 2 * 2048 * 8192 * 4

    def temporaries(loss):
        grad = jax.jit(jax.grad(lambda f, h: loss(f, h)[0], (0, 1)))
        return grad.lower(features, head).compile().memory_analysis().temp_size_in_bytes

    chunked = temporaries(lambda f, h: chunked_cross_entropy_sum(f, h, targets, mask, chunk_tokens=256))
    plain_bytes = temporaries(lambda f, h: plain(f, h, targets, mask))
    assert plain_bytes >= full_bytes
    assert chunked < full_bytes / 4, (chunked, plain_bytes)  # ~2 blocks of [256, 8192] float32


def test_the_train_step_loss_in_blocks_equals_the_plain_one():
    """_batch_loss with loss_chunk_tokens: the same total (MoM's aux loss included), cross-entropy
    and gradients of every parameter, for tied and untied heads (the untied one with a logit
    multiplier and soft-capping, which the blocks must apply as the model's logits do)."""
    from flax import nnx

    from seqmix.configuration import build
    from seqmix.models.config import ModelConfig
    from seqmix.models.lm import LanguageModel
    from seqmix.train.step import _batch_loss

    inputs = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1), "positions": jnp.zeros_like(inputs),
             "segment_ids": jnp.array([[1] * 7 + [2] * 3 + [0] * 2, [1] * 12])}
    for tied in (True, False):
        logits = {} if tied else {"logit_multiplier": 3.0, "logit_soft_cap": 1.0}
        config = build(ModelConfig, {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.2,
                                     "tie_embeddings": tied, "layer_pattern": ["mom", "attention"], **logits}, "model")
        graphdef, params, rest = nnx.split(LanguageModel(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
        grad_fn = jax.jit(jax.value_and_grad(_batch_loss, argnums=1, has_aux=True), static_argnums=(0, 4, 5))
        (total, (cross_entropy, count)), grads = grad_fn(graphdef, params, rest, batch, None, 0)
        (total_b, (cross_entropy_b, count_b)), grads_b = grad_fn(graphdef, params, rest, batch, None, 5)
        assert float(total) > float(cross_entropy)  # the aux loss is in
        np.testing.assert_allclose([total_b, cross_entropy_b, count_b], [total, cross_entropy, count], rtol=1e-6)
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads_b), jax.tree.leaves(grads)):
            assert float(jnp.linalg.norm(got - want)) <= 1e-5 * float(jnp.linalg.norm(want)) + 1e-9, (tied, path)


@pytest.mark.eight_devices
def test_blocks_keep_the_rows_on_their_devices():
    """On 8 devices holding one row each, a device's blocks are its own row's: blocks of the
    flattened batch would gather every row's features (8 x [2048, 32] float32) onto each."""
    from jax.sharding import NamedSharding, PartitionSpec

    from seqmix.train.config import MeshConfig
    from seqmix.train.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=8))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    features, head, targets, _ = inputs(2, 2048, 32, 512)
    features, targets = jnp.tile(features, (4, 1, 1)), jnp.tile(targets, (4, 1))
    mask = jnp.ones(targets.shape, bool)
    grad = jax.jit(jax.grad(lambda f: chunked_cross_entropy_sum(f, head, targets, mask, chunk_tokens=1024)[0]),
                   in_shardings=rows)
    temporaries = grad.lower(features).compile().memory_analysis().temp_size_in_bytes
    one_row = 2048 * 32 * 4
    assert temporaries < 4 * one_row, temporaries
