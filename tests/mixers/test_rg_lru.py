"""What the RG-LRU holds beyond the mixer harness (tests/mixers/test_mixers.py) and RecurrentGemma's
parity with transformers (tests/models/test_hf_hybrids.py): Griffin's bounded derivative."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.mixers.rg_lru import sqrt_bounded_derivative


def test_the_input_normaliser_has_griffins_bounded_derivative():
    """The root of sqrt(1 - a^2) has derivative 1 / (2 sqrt(x)) clipped at 1000 (Griffin's, and
    transformers' SqrtBoundDerivative): finite at x = 0, where a = 1, so that training cannot NaN there."""
    x = jnp.array([0.0, 1e-9, 0.25, 1.0])
    np.testing.assert_allclose(jax.vmap(jax.grad(sqrt_bounded_derivative))(x), [1000.0, 1000.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(sqrt_bounded_derivative(x), jnp.sqrt(x))
