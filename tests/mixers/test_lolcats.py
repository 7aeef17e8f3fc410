"""LoLCATs attention against its definition (eq. 6 of the paper), written out per token in float64
numpy from the module's own projections, feature maps and window factors, on packed rows with
padding and with grouped-query heads; decoding is in test_mixers.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.layers.rotary import apply_rotary
from seqmix.layers.transfer import TransferParam
from seqmix.mixers.lolcats import LolcatsAttention, LolcatsConfig
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 32, "n_heads": 4, "n_kv_heads": 2}, "model")  # head_dim 8
WINDOW = 4


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def lolcats_with_trained_maps(seed=0):
    """A layer whose transfer parameters are random (as after attention transfer), not their
    identity / 0.1 initialisation, so that each head's and each map's own values matter."""
    mixer = LolcatsAttention(MODEL, build(LolcatsConfig, {"window": WINDOW}, "mixer"), rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 3))
    for variable in (mixer.q_map.weight, mixer.k_map.weight, mixer.window_factor):
        variable[...] = variable[...] + jax.random.normal(next(keys), variable.shape)
    return mixer


def expected_heads(mixer, x, segment_ids):
    """o [B, T, H, d] of the definition: per segment, softmax terms gamma_h exp(s - c_t) over the
    last W tokens, Hedgehog terms over the older ones, one normaliser; positions restart per segment."""
    segment_ids = np.asarray(segment_ids)
    positions = np.zeros(segment_ids.shape, np.int32)
    for b, row in enumerate(segment_ids):
        for t in range(1, len(row)):
            positions[b, t] = positions[b, t - 1] + 1 if row[t] == row[t - 1] else 0
    rotate = lambda a: np.asarray(apply_rotary(a, jnp.asarray(positions), MODEL.rope_theta), np.float64)
    q, k = (rotate(mixer._heads(p(x))) for p in (mixer.q_proj, mixer.k_proj))
    v = np.asarray(mixer._heads(mixer.v_proj(x)), np.float64)
    q_map, k_map = (np.asarray(m.weight[...], np.float64) for m in (mixer.q_map, mixer.k_map))
    gamma = 1 / (1 + np.exp(-np.asarray(mixer.window_factor[...], np.float64)))
    hedgehog = lambda a, w: np.concatenate([softmax(a @ w), softmax(-a @ w)])
    out = np.zeros(q.shape)
    heads, group, dim = q.shape[2], q.shape[2] // k.shape[2], q.shape[3]
    for b, row in enumerate(segment_ids):
        for segment in set(row.tolist()) - {0}:
            tokens = np.flatnonzero(row == segment)
            for i, t in enumerate(tokens):
                window, older = tokens[max(0, i - WINDOW + 1): i + 1], tokens[: max(0, i - WINDOW + 1)]
                for h in range(heads):
                    kv = h // group
                    scores = k[b, window, kv] @ q[b, t, h] / np.sqrt(dim)
                    weights = list(gamma[h] * np.exp(scores - scores.max()))
                    weights += [hedgehog(q[b, t, h], q_map[h]) @ hedgehog(k[b, j, kv], k_map[h]) for j in older]
                    weights = np.array(weights)
                    out[b, t, h] = weights @ v[b, np.concatenate([window, older]), kv] / weights.sum()
    return jnp.asarray(out, jnp.float32), jnp.asarray(positions)


def test_output_is_the_window_softmax_and_older_hedgehog_terms_under_one_normaliser():
    mixer = lolcats_with_trained_maps()
    x = jax.random.normal(jax.random.key(1), (3, 15, 32))
    segment_ids = jnp.array([[1] * 9 + [2] * 3 + [0] * 3,  # a long and a short document, then padding
                             [1] * 15,
                             [0] * 4 + [1] * 11])
    heads, positions = expected_heads(mixer, x, segment_ids)
    expected = mixer.o_proj(heads.reshape(3, 15, -1))
    out, _ = mixer(x, segment_ids=segment_ids, positions=positions)
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(out)[real], np.asarray(expected)[real]) < 1e-5


def test_the_added_parameters_are_transfer_parameters_and_start_as_lolcats_initialises_them():
    mixer = LolcatsAttention(MODEL, build(LolcatsConfig, {"window": WINDOW}, "mixer"), rngs=nnx.Rngs(0))
    added = nnx.to_flat_state(nnx.state(mixer, TransferParam))
    assert sorted(".".join(map(str, path)) for path, _ in added) == ["k_map.weight", "q_map.weight", "window_factor"]
    assert np.array_equal(mixer.q_map.weight[...], np.broadcast_to(np.eye(8), (4, 8, 8)))
    np.testing.assert_allclose(jax.nn.sigmoid(mixer.window_factor[...]), 0.1, rtol=1e-6)
