"""Linear attention against its quadratic form, and its feature maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import ConfigError, build
from seqmix.layers import feature_maps
from seqmix.mixers.linear_attention import LinearAttention, LinearAttentionConfig
from seqmix.models.config import ModelConfig


@pytest.mark.parametrize("feature_map, normalize", [("elu", True), ("hedgehog", True), ("nalaformer", True),
                                                  ("identity", False)])
def test_matches_quadratic_form(feature_map, normalize):
    """o_t = sum_{j<=t} (phi(q_t).phi(k_j)) v_j [/ sum_{j<=t} phi(q_t).phi(k_j)], per head."""
    model_config = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")
    config = build(LinearAttentionConfig, {"feature_map": feature_map, "normalize": normalize}, "mixer")
    mixer = LinearAttention(model_config, config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 11, 16))
    y, _ = mixer(x)
    q = mixer._phi(mixer.split_heads(mixer.q_proj(x)), mixer.q_map, key=False)
    k = mixer._phi(mixer.split_heads(mixer.k_proj(x)), mixer.k_map, key=True)
    v = mixer.split_heads(mixer.v_proj(x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((11, 11)))
    out = jnp.einsum("bhts,bshd->bthd", scores, v)
    if normalize:
        out = out / (jnp.sum(scores, axis=-1).transpose(0, 2, 1)[..., None] + 1e-6)
    assert rel_err(y, mixer.output(out, x)) < 1e-5


def test_feature_maps():
    x = jnp.array([[[[-1.0, 0.0, 2.0]]]])
    np.testing.assert_allclose(feature_maps.apply_fixed("elu", x), [[[[np.exp(-1.0), 1.0, 3.0]]]], rtol=1e-6)
    np.testing.assert_allclose(feature_maps.apply_fixed("relu", x), [[[[0.0, 0.0, 2.0]]]])
    np.testing.assert_allclose(jnp.sum(feature_maps.apply_fixed("softmax", x), axis=-1), 1.0, rtol=1e-6)
    hedgehog = feature_maps.Hedgehog(heads=1, dim=3)
    np.testing.assert_allclose(hedgehog(x), jnp.concatenate([jax.nn.softmax(x), jax.nn.softmax(-x)], axis=-1),
                               rtol=1e-6)  # identity at initialisation


def test_normaliser_needs_a_positive_feature_map():
    with pytest.raises(ConfigError, match="mixer.normalize"):
        build(LinearAttentionConfig, {"feature_map": "identity", "normalize": True}, "mixer").validate("mixer")
    with pytest.raises(ConfigError, match="mixer.feature_map"):
        build(LinearAttentionConfig, {"feature_map": "cosine"}, "mixer").validate("mixer")
