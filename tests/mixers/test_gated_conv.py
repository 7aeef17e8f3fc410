"""The gated short convolution against its formula, computed token by token in float64 from the
module's own weights, on a packed row with padding."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.configuration import build
from seqmix.mixers.gated_conv import GatedConv, GatedConvConfig
from seqmix.models.config import ModelConfig


def test_packed_row_matches_the_formula_with_each_document_starting_afresh():
    """y_t = ((sum_i w_i x_{t-i}) * (x_t W_g)) W_o, the sum over t's own segment; padding is 0."""
    model = build(ModelConfig, {"d_model": 8, "n_heads": 2}, "model")
    mixer = GatedConv(model, build(GatedConvConfig, {"width": 3}, "mixer"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 12, 8))
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 3]])
    weight, w_g, w_o = (np.asarray(a, np.float64) for a in (mixer.conv.weight[...], mixer.g_proj.kernel[...],
                                                            mixer.o_proj.kernel[...]))
    xs, segments = np.asarray(x[0], np.float64), np.asarray(segment_ids[0])
    expected = np.zeros((12, 8))
    for t in range(12):
        if segments[t] == 0:
            continue  # padding: its output is never read, but stays finite
        conv = sum(weight[i] * xs[t - i] for i in range(3) if t - i >= 0 and segments[t - i] == segments[t])
        expected[t] = (conv * (xs[t] @ w_g)) @ w_o
    y, _ = mixer(x, segment_ids=segment_ids)
    real = segments != 0
    np.testing.assert_allclose(np.asarray(y[0])[real], expected[real], rtol=1e-5, atol=1e-6)
    # Without segment ids the whole row is one document: the third token of document 2 now sees
    # the end of document 1.
    whole, _ = mixer(x)
    assert not np.allclose(np.asarray(whole[0, 4]), expected[4], atol=1e-4)
