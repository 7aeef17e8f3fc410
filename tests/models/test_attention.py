"""Softmax attention against a direct NumPy implementation: masks, windows, GQA, RoPE, cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.layers.rotary import apply_rotary
from seqmix.mixers import attention
from seqmix.mixers.attention import (Attention, AttentionConfig, attention_mask, blockwise_attention,
                                     softmax_attention)
from seqmix.models.config import ModelConfig


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def make_attention(window=None, heads=4, kv_heads=2, d_model=32, seed=0, causal=True):
    model_config = build(ModelConfig, {"d_model": d_model, "n_heads": heads, "n_kv_heads": kv_heads})
    return Attention(model_config, AttentionConfig(sliding_window=window, causal=causal), rngs=nnx.Rngs(seed))


def rotate_np(x, positions, theta=10000.0):
    """RoPE written out per pair of channels (i, i + D/2)."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for i in range(half):
        angle = positions[..., None] * theta ** (-i / half)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def attention_np(layer, x, segment_ids, positions, window, causal=True):
    """Loops over batch, heads and queries; visible keys chosen by explicit conditions."""
    x = np.asarray(x, np.float64)
    w = {name: np.asarray(getattr(layer, name).kernel[...], np.float64) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    batch, length, _ = x.shape
    head_dim = layer.head_dim
    q = rotate_np((x @ w["q_proj"]).reshape(batch, length, -1, head_dim), positions)
    k = rotate_np((x @ w["k_proj"]).reshape(batch, length, -1, head_dim), positions)
    v = (x @ w["v_proj"]).reshape(batch, length, -1, head_dim)
    heads, kv_heads = q.shape[2], k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i in range(length):
                visible = [j for j in range(length) if (j <= i or not causal)
                           and segment_ids[b, j] == segment_ids[b, i] != 0
                           and (window is None or i - j < window)]
                if not visible:
                    continue
                logits = np.array([q[b, i, h] @ k[b, j, g] for j in visible]) / np.sqrt(head_dim)
                p = np.exp(logits - logits.max())
                out[b, i, h] = (p / p.sum()) @ v[b, visible, g]
    return out.reshape(batch, length, -1) @ w["o_proj"]


@pytest.mark.parametrize("window, causal", [(None, True), (3, True), (None, False)])
def test_packed_attention_matches_direct_implementation(window, causal):
    """Causal (global, windowed) and bidirectional (an encoder's: each token sees its whole segment,
    which leaves it nothing to decode with)."""
    layer = make_attention(window, causal=causal)
    x = jax.random.normal(jax.random.key(1), (2, 13, 32))
    segment_ids = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13], np.int32)
    positions = np.array([list(range(5)) + list(range(6)) + [0, 0], list(range(13))], np.int32)
    y, _ = layer(x, segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions))
    expected = attention_np(layer, x, segment_ids, positions, window, causal)
    valid = segment_ids != 0
    assert rel_err(np.asarray(y)[valid], expected[valid]) < 1e-5
    assert np.all(np.isfinite(np.asarray(y)))  # padding rows included
    if not causal:
        with pytest.raises(ValueError, match="causal: false is not causal"):
            layer.init_cache(2, 13, jnp.float32)


@pytest.mark.parametrize("window, causal", [(None, True), (5, True), (20, True), (None, False)])
def test_blockwise_attention_matches_the_dense_form_with_its_gradients(window, causal):
    """Blocks of 8 over 45 tokens (not a multiple of 8), grouped heads (4 query heads on 2 kv
    heads), packed segments with padding inside and at the end of a row, windows shorter and
    longer than a block: outputs and the gradients of q, k and v equal `softmax_attention`'s on the
    real tokens, and everything is finite (a padding query, which sees no key, averages values, as
    the dense form's does)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 45, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 45, 2, 8)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray([[1] * 12 + [0] * 3 + [2] * 25 + [0] * 5, [1] * 45], jnp.int32)
    index = jnp.broadcast_to(jnp.arange(45, dtype=jnp.int32), (2, 45))
    mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids, window=window, causal=causal)
    real = np.asarray(segment_ids != 0)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real[..., None, None]
    forms = {"dense": lambda q, k, v: softmax_attention(q, k, v, mask, 8**-0.5),
             "blocks": lambda q, k, v: blockwise_attention(q, k, v, segment_ids, 8**-0.5, window=window,
                                                           causal=causal, block=8)}
    outputs = {name: jax.jit(form)(q, k, v) for name, form in forms.items()}
    grads = {name: jax.jit(jax.grad(lambda q, k, v: jnp.sum(form(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)
             for name, form in forms.items()}
    assert rel_err(np.asarray(outputs["blocks"])[real], np.asarray(outputs["dense"])[real]) < 1e-5
    assert np.all(np.isfinite(np.asarray(outputs["blocks"])))
    for blocks, dense in zip(grads["blocks"], grads["dense"], strict=True):
        assert np.all(np.isfinite(np.asarray(blocks))) and rel_err(blocks, dense) < 1e-5


def test_blockwise_attention_in_bfloat16_keeps_its_dtypes_and_the_float32_values():
    """bfloat16 q, k, v (its written-out backward casts the matmuls' operands to the inputs' dtype):
    the output and every gradient come back in bfloat16, within bfloat16's rounding of the float32
    dense form's, causal blocks skipped and read alike."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 40, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 8)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray([[1] * 17 + [2] * 23], jnp.int32)
    index = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (1, 40))
    mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    dense = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, mask, 8**-0.5) * weights)
    blocks = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, segment_ids, 8**-0.5, block=8).astype(jnp.float32)
                                     * weights)
    expected = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
    halves = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert blockwise_attention(*halves, segment_ids, 8**-0.5, block=8).dtype == jnp.bfloat16
    for got, want in zip(jax.jit(jax.grad(blocks, argnums=(0, 1, 2)))(*halves), expected, strict=True):
        assert got.dtype == jnp.bfloat16 and rel_err(got.astype(jnp.float32), want) < 3e-2


def test_a_window_shorter_than_a_block_takes_blocks_about_its_length():
    assert [attention.block_for(w) for w in (None, 5, 64, 65, 128, 255, 256, 4096)] == [256, 64, 64, 128, 128, 256,
                                                                                         256, 256]


@pytest.mark.parametrize("window", [None, 64, 300])
def test_long_inputs_take_the_blockwise_form_with_its_memory_and_the_same_output(monkeypatch, window):
    """From attention.BLOCKWISE_FROM tokens the layer attends in blocks (of 64 for a 64-token window,
    `block_for`): the same output as the dense form, and its gradient's compiled program keeps
    under half the temporary bytes."""
    layer = make_attention(window)
    x = jax.random.normal(jax.random.key(2), (1, attention.BLOCKWISE_FROM, 32))
    graphdef, state = nnx.split(layer)

    def compiled(state, x):
        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)
        return jax.jit(jax.value_and_grad(loss)).lower(state, x).compile()

    blockwise = compiled(state, x)
    monkeypatch.setattr(attention, "BLOCKWISE_FROM", 10**9)  # every length dense
    dense = compiled(state, x)
    (blockwise_loss, blockwise_grads), (dense_loss, dense_grads) = blockwise(state, x), dense(state, x)
    assert float(blockwise_loss) == pytest.approx(float(dense_loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(blockwise_grads), jax.tree.leaves(dense_grads), strict=True):
        assert rel_err(a, b) < 1e-4
    blockwise_bytes, dense_bytes = (c.memory_analysis().temp_size_in_bytes for c in (blockwise, dense))
    assert blockwise_bytes < 0.5 * dense_bytes, (blockwise_bytes, dense_bytes)


def test_packed_rows_do_not_attend_across_segments():
    """Changing one document must not change the outputs of the other document packed beside it."""
    layer = make_attention()
    x = jax.random.normal(jax.random.key(2), (1, 12, 32))
    segment_ids = jnp.asarray([[1] * 7 + [2] * 5])
    positions = jnp.asarray([list(range(7)) + list(range(5))])
    y, _ = layer(x, segment_ids=segment_ids, positions=positions)
    x_changed = x.at[:, :7].set(jax.random.normal(jax.random.key(3), (1, 7, 32)))
    y_changed, _ = layer(x_changed, segment_ids=segment_ids, positions=positions)
    np.testing.assert_allclose(y[:, 7:], y_changed[:, 7:], rtol=1e-6, atol=1e-6)
    alone, _ = layer(x[:, 7:])  # the second document on its own row
    np.testing.assert_allclose(y[:, 7:], alone, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(4), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(5), (1, 1, 1, 16))
    def score(pq, pk):
        return float(jnp.sum(apply_rotary(q, jnp.array([[pq]]), 10000.0) * apply_rotary(k, jnp.array([[pk]]), 10000.0)))
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    np.testing.assert_allclose(apply_rotary(q, jnp.array([[0]]), 10000.0), q)


@pytest.mark.parametrize("window", [None, 4])
def test_cached_decode_equals_full_forward(window):
    layer = make_attention(window)
    x = jax.random.normal(jax.random.key(6), (2, 11, 32))
    full, _ = layer(x)
    cache = layer.init_cache(2, 16, jnp.float32)
    outputs = []
    prefill, cache = layer(x[:, :6], positions=jnp.broadcast_to(jnp.arange(6), (2, 6)), cache=cache)
    outputs.append(prefill)
    for t in range(6, 11):
        step, cache = layer(x[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache)
        outputs.append(step)
    assert rel_err(jnp.concatenate(outputs, axis=1), full) < 1e-5
    assert np.array_equal(np.asarray(cache.lengths), [11, 11])


def test_sliding_window_cache_is_a_ring_of_the_window():
    """Chunks shorter and longer than the window, from an empty ring: outputs == full forward,
    and the ring holds W slots whatever the context."""
    layer = make_attention(window=5)
    x = jax.random.normal(jax.random.key(7), (2, 23, 32))
    full, _ = layer(x)
    cache = layer.init_cache(2, 1000, jnp.float32)
    assert cache.k.shape[1] == 5
    outputs, start = [], 0
    for stop in (2, 3, 10, 11, 12, 19, 23):
        positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        out, cache = layer(x[:, start:stop], positions=positions, cache=cache)
        outputs.append(out)
        start = stop
    assert rel_err(jnp.concatenate(outputs, axis=1), full) < 1e-5
    assert cache.k.shape[1] == 5 and np.array_equal(np.asarray(cache.lengths), [23, 23])

