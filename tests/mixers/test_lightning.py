"""Lightning attention against a per-token loop of its recurrence, with q, k, v computed directly
from the module's own projections, and the depth schedule of its decays (MiniMax's formula; the
whole model against transformers' MiniMax is in tests/models/test_hf_hybrids.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.mixers.lightning import LightningAttention, LightningConfig, lightning_slopes
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 4, "n_layers": 3}, "model")


def decayed_recurrence(q, k, v, decay):
    """S_t = decay_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, per row and head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(v.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            state = np.zeros((k.shape[-1], v.shape[-1]))
            for t in range(q.shape[1]):
                state = decay[h] * state + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = q[b, t, h] @ state
    return jnp.asarray(out, jnp.float32)


def test_slopes_are_minimax_s_for_any_head_count():
    np.testing.assert_allclose(lightning_slopes(4, 0, 3), np.array([2**-2, 2**-4, 2**-6, 2**-8]) * (1 + 1e-5),
                               rtol=1e-6)
    # Not a power of two: still the powers of 2^(-8/H) (ALiBi would interleave those of 4 and 8 heads).
    np.testing.assert_allclose(lightning_slopes(6, 0, 3), 2.0 ** (-8 * np.arange(1, 7) / 6) * (1 + 1e-5), rtol=1e-6)


def test_each_layer_matches_its_recurrence_with_decays_that_weaken_with_depth():
    x = jax.random.normal(jax.random.key(1), (2, 70, 16))  # longer than one 64-token chunk
    slopes = 2.0 ** (-2.0 * np.arange(1, 5))
    for layer_index in range(3):
        factor = 1 - layer_index / (2 + 1e-5) + 1e-5  # 1 - l / (L - 1 + 1e-5) + 1e-5: 1, 1/2 and about 0
        mixer = LightningAttention(MODEL, build(LightningConfig, {}, "mixer"), layer_index=layer_index,
                                   rngs=nnx.Rngs(0))
        q, k, v = (jax.nn.silu(mixer.split_heads(p(x))) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
        expected = decayed_recurrence(q, k, v, np.exp(-slopes * factor))
        assert rel_err(mixer(x)[0], mixer.output(expected, x)) < 1e-4, layer_index


def test_a_one_layer_model_decays_as_a_first_layer():
    model = build(ModelConfig, {"d_model": 16, "n_heads": 4, "n_layers": 1}, "model")
    mixer = LightningAttention(model, build(LightningConfig, {}, "mixer"), layer_index=0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 9, 16))
    q, k, v = (jax.nn.silu(mixer.split_heads(p(x))) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    expected = decayed_recurrence(q, k, v, np.exp(-(2.0 ** (-2.0 * np.arange(1, 5))) * (1 + 1e-5)))
    assert rel_err(mixer(x)[0], mixer.output(expected, x)) < 1e-5
