"""What the RG-LRU holds beyond the mixer harness (tests/mixers/test_mixers.py) and RecurrentGemma's
parity with transformers (tests/models/test_hf_hybrids.py): Griffin's bounded derivative, and its
two scans (parallel for accelerators, sequential for CPU) against a loop."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.mixers.rg_lru import _parallel_scan, _sequential_scan, sqrt_bounded_derivative


def test_the_input_normaliser_has_griffins_bounded_derivative():
    """The root of sqrt(1 - a^2) has derivative 1 / (2 sqrt(x)) clipped at 1000 (Griffin's, and
    transformers' SqrtBoundDerivative): finite at x = 0, where a = 1, so that training cannot NaN there."""
    x = jnp.array([0.0, 1e-9, 0.25, 1.0])
    np.testing.assert_allclose(jax.vmap(jax.grad(sqrt_bounded_derivative))(x), [1000.0, 1000.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(sqrt_bounded_derivative(x), jnp.sqrt(x))


def test_both_scans_equal_a_loop_with_resets_and_padding_and_their_gradients_agree():
    """a = 0 resets the state, (a = 1, u = 0) leaves it alone (padding): the two scans give the
    loop's states, and the same gradients for a, u and the initial state."""
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(keys[0], (2, 13, 5)).at[:, 4].set(0.0).at[1, 7:9].set(1.0)
    u = jax.random.normal(keys[1], (2, 13, 5)).at[1, 7:9].set(0.0)
    initial = jax.random.normal(keys[2], (2, 5))
    state, expected = initial, []
    for t in range(13):
        state = a[:, t] * state + u[:, t]
        expected.append(state)
    expected = jnp.stack(expected, axis=1)
    loss = lambda scan: lambda *args: jnp.sum(jnp.sin(scan(*args)))
    for scan in (_parallel_scan, _sequential_scan):
        np.testing.assert_allclose(scan(a, u, initial), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.grad(loss(_sequential_scan), argnums=(0, 1, 2))(a, u, initial),
                         jax.grad(loss(_parallel_scan), argnums=(0, 1, 2))(a, u, initial)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
