"""NaLaFormer's norm-aware feature maps and its causal layer against float64 numpy oracles written
from the paper's equations (the shared harness, tests/mixers/test_mixers.py, checks decode,
packing and training)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import packed_row, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.layers import feature_maps
from seqmix.mixers.nalaformer import NaLaFormer, NaLaFormerConfig
from seqmix.models.config import ModelConfig


def query_map(q):
    """phi_q(q) = [relu(q/||q||) ** p, relu(-q/||q||) ** p], p = 3 (1/2 + tanh ||q||), float64."""
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    power = 3.0 * (0.5 + np.tanh(norm))
    return np.concatenate([np.maximum(q / norm, 0) ** power, np.maximum(-q / norm, 0) ** power], axis=-1)


def key_map(k):
    """phi_k(k) = [relu(k) ** 3, relu(-k) ** 3], float64."""
    return np.concatenate([np.maximum(k, 0) ** 3, np.maximum(-k, 0) ** 3], axis=-1)


def test_feature_maps_follow_the_paper_and_a_longer_query_scores_spikier():
    """The maps equal the equations, with finite gradients where a coordinate is exactly 0; the
    same direction at half the norm gives a higher-entropy distribution over keys (what the
    query-norm power restores), and every score is >= 0."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 2, 8)).at[0, 0, 0, 3].set(0.0)
    query, key = feature_maps.norm_aware_query, feature_maps.norm_aware_key
    summed = lambda side: jax.grad(lambda a: jnp.sum(side(a)))
    by_name = lambda a, key: feature_maps.apply_fixed("nalaformer", a, key=key)
    maps = jax.jit(lambda a: (by_name(a, False), by_name(a, True), query(0.5 * a), summed(query)(a), summed(key)(a)))
    queries, keys, short_queries, *gradients = (np.asarray(m, np.float64) for m in maps(x))
    np.testing.assert_allclose(queries, query_map(np.asarray(x, np.float64)), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(keys, key_map(np.asarray(x, np.float64)), rtol=1e-5)
    assert all(np.isfinite(g).all() for g in gradients)
    entropies = []
    for query in (short_queries[0, 1, 0], queries[0, 1, 0]):
        scores = keys[1, :, 0] @ query  # against 5 keys
        assert (scores >= 0).all()
        p = scores / scores.sum()
        entropies.append(-np.sum(p * np.log(p + 1e-30)))
    assert entropies[1] < entropies[0]


def layer_oracle(mixer, x, segment_ids):
    """y [B, T, D] float64 of the causal layer, token by token within each segment: normalised
    phi_q . phi_k scores over the segment so far, plus a causal depthwise conv of v over the
    segment, a LayerNorm over all heads, a silu gate and o_proj."""
    weight = lambda layer: np.asarray(layer.kernel[...], np.float64)
    x, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
    heads = mixer.heads
    q, k, v, g = (x @ weight(p) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.g_proj))
    split = lambda a: a.reshape(*a.shape[:2], heads, -1)
    phi_q, phi_k, v_heads = query_map(split(q)), key_map(split(k)), split(v)
    conv, conv_bias = np.asarray(mixer.lepe.weight[...], np.float64), np.asarray(mixer.lepe.bias[...], np.float64)
    scale, shift = np.asarray(mixer.norm.weight[...], np.float64), np.asarray(mixer.norm.bias[...], np.float64)
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if ids[b, t] == 0:
                continue
            seen = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
            scores = np.einsum("hf,shf->sh", phi_q[b, t], phi_k[b, seen])
            attended = np.einsum("sh,shd->hd", scores, v_heads[b, seen]) / (scores.sum(0)[:, None] + 1e-6)
            lepe = conv_bias + sum(conv[i] * v[b, t - i] for i in range(conv.shape[0]) if t - i in seen)
            mixed = attended.reshape(-1) + lepe
            normed = (mixed - mixed.mean()) / np.sqrt(mixed.var() + mixer.norm.eps) * scale + shift
            out[b, t] = (normed * g[b, t] / (1 + np.exp(-g[b, t]))) @ weight(mixer.o_proj)
    return out


def test_layer_matches_its_causal_oracle_on_packed_rows():
    model_config = build(ModelConfig, {"d_model": 32, "n_heads": 2}, "model")
    mixer = NaLaFormer(model_config, build(NaLaFormerConfig, {"conv_width": 3}, "mixer"), rngs=nnx.Rngs(0))
    mixer = with_random_weights(mixer, seed=1)
    x, segment_ids = packed_row(32)
    y, _ = nnx.jit(lambda m, a, s: m(0.3 * a, segment_ids=s))(mixer, x, segment_ids)
    real = np.asarray(segment_ids)[..., None] != 0
    expected = layer_oracle(mixer, 0.3 * x, segment_ids)
    assert rel_err(np.where(real, y, 0), expected) < 1e-4
