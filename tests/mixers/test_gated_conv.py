"""The gated short convolution against its formula, computed token by token in float64 from the
module's own weights, on a packed row with padding: Zoology's form and LFM2's (an input gate, biases)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.mixers.gated_conv import GatedConv, GatedConvConfig
from seqmix.models.config import ModelConfig


@pytest.mark.parametrize("lfm2", [False, True])
def test_packed_row_matches_the_formula_with_each_document_starting_afresh(lfm2):
    """y_t = ((sum_i w_i u_{t-i} + b) * (x_t W_g + b_g)) W_o + b_o, the sum over t's own segment, u = x
    (Zoology) or (x W_b + b_b) * (x W_v + b_v) (LFM2); padding is 0."""
    model = build(ModelConfig, {"d_model": 8, "n_heads": 2}, "model")
    mixer = GatedConv(model, build(GatedConvConfig, {"width": 3, "input_gate": lfm2, "bias": lfm2}, "mixer"),
                      rngs=nnx.Rngs(0))
    for index, (_, param) in enumerate(nnx.to_flat_state(nnx.state(mixer, nnx.Param))):
        param.set_value(param[...] + 0.3 * jax.random.normal(jax.random.key(index), param.shape))  # biases off 0
    x = jax.random.normal(jax.random.key(1), (1, 12, 8))
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 3]])
    f64 = lambda a: np.asarray(a, np.float64)
    linear = lambda layer, h: h @ f64(layer.kernel[...]) + (f64(layer.bias[...]) if lfm2 else 0.0)
    xs, segments = f64(x[0]), np.asarray(segment_ids[0])
    u = linear(mixer.b_proj, xs) * linear(mixer.v_proj, xs) if lfm2 else xs
    weight, conv_bias = f64(mixer.conv.weight[...]), f64(mixer.conv.bias[...]) if lfm2 else 0.0
    expected = np.zeros((12, 8))
    for t in range(12):
        if segments[t] == 0:
            continue  # padding: its output is never read, but stays finite
        conv = sum(weight[i] * u[t - i] for i in range(3) if t - i >= 0 and segments[t - i] == segments[t])
        expected[t] = linear(mixer.o_proj, (conv + conv_bias) * linear(mixer.g_proj, xs[t]))
    y, _ = mixer(x, segment_ids=segment_ids)
    real = segments != 0
    np.testing.assert_allclose(np.asarray(y[0])[real], expected[real], rtol=1e-5, atol=1e-5)
    # Without segment ids the whole row is one document: the third token of document 2 now sees
    # the end of document 1.
    whole, _ = mixer(x)
    assert not np.allclose(np.asarray(whole[0, 4]), expected[4], atol=1e-4)
