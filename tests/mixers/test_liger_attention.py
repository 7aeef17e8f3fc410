"""Liger attention against its definition: half a per-token loop of the gated recurrence, half a
sliding-window softmax, both written out in numpy from the module's own projections; the
parameters of an attention layer load unchanged; decoding a left-padded batch from the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.layers.rotary import apply_rotary
from seqmix.mixers.attention import Attention, AttentionConfig
from seqmix.mixers.liger_attention import LigerAttention, LigerAttentionConfig
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 32, "n_heads": 4, "n_kv_heads": 2}, "model")  # head_dim 8
WINDOW = 4


def liger(seed=0, **options):
    return LigerAttention(MODEL, build(LigerAttentionConfig, {"window": WINDOW, **options}, "mixer"),
                          rngs=nnx.Rngs(seed))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_heads(mixer, x, segment_ids, recurrence="gla", window=WINDOW):
    """0.5 * gated recurrence + 0.5 * windowed softmax [B, T, H, D] per segment, from x [B, T, D]
    (the recurrence alone when window is None); zero at padding. Positions restart at each segment.
    recurrence "gla": gate sigmoid(k)^(1/16), key softmax(k); "hgrn2": gate sigmoid(k), key 1 - gate."""
    q, k, v = (np.asarray(mixer._heads(p(x)), np.float64) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    segment_ids = np.asarray(segment_ids)
    positions = np.zeros(segment_ids.shape, np.int32)
    for b, row in enumerate(segment_ids):
        for t in range(1, len(row)):
            positions[b, t] = positions[b, t - 1] + 1 if row[t] == row[t - 1] else 0
    rotate = lambda a: np.asarray(apply_rotary(jnp.asarray(a, jnp.float32), jnp.asarray(positions), MODEL.rope_theta))
    q_rot, k_rot = rotate(q), rotate(k)
    sigmoid = 1 / (1 + np.exp(-k))
    gate, key = (sigmoid ** (1 / 16), softmax(k)) if recurrence == "gla" else (sigmoid, 1 - sigmoid)
    out = np.zeros(q.shape)
    heads, group, dim = q.shape[2], q.shape[2] // k.shape[2], q.shape[3]
    for b, row in enumerate(segment_ids):
        for segment in set(row.tolist()) - {0}:
            tokens = np.flatnonzero(row == segment)
            for h in range(heads):
                kv = h // group
                state = np.zeros((dim, dim))
                for i, t in enumerate(tokens):
                    state = gate[b, t, kv][:, None] * state + np.outer(key[b, t, kv], v[b, t, kv])
                    recurrent = softmax(q[b, t, h]) @ state
                    if window is None:
                        out[b, t, h] = recurrent
                        continue
                    seen = tokens[max(0, i - window + 1): i + 1]
                    weights = softmax(k_rot[b, seen, kv] @ q_rot[b, t, h] / np.sqrt(dim))
                    out[b, t, h] = 0.5 * recurrent + 0.5 * weights @ v[b, seen, kv]
    return jnp.asarray(out, jnp.float32), jnp.asarray(positions)


@pytest.mark.parametrize("recurrence, window", [("gla", WINDOW), ("gla", None), ("hgrn2", None), ("hgrn2", WINDOW)])
def test_output_is_the_mean_of_a_gated_recurrence_and_a_sliding_window_softmax(recurrence, window):
    """Liger attention (gla, W), Liger-GLA (gla, no window), Liger-HGRN2 (hgrn2, no window)."""
    mixer = liger(recurrence=recurrence, window=window)
    x = jax.random.normal(jax.random.key(1), (3, 14, 32))
    segment_ids = jnp.array([[1] * 6 + [2] * 5 + [0] * 3,  # two documents and padding
                             [1] * 14,
                             [0] * 3 + [1] * 11])
    heads, positions = expected_heads(mixer, x, segment_ids, recurrence, window)
    expected = mixer.o_proj(heads.reshape(3, 14, -1))
    out, _ = mixer(x, segment_ids=segment_ids, positions=positions)
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(out)[real], np.asarray(expected)[real]) < 1e-5


def test_an_attention_layer_loads_unchanged():
    attention = Attention(MODEL, AttentionConfig(), rngs=nnx.Rngs(1))
    mixer = liger()
    shapes = lambda module: jax.tree.map(jnp.shape, nnx.state(module, nnx.Param))
    assert shapes(mixer) == shapes(attention)
    nnx.update(mixer, nnx.state(attention, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (1, 5, 32))
    np.testing.assert_array_equal(mixer.k_proj(x), attention.k_proj(x))
