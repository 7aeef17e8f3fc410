"""The chunked `xla` paths' shared pieces: the gates' prefix sums, and what per-key GLA's choice of
intra-chunk form branches over."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.gla import chunk_gla


@pytest.mark.parametrize("width", [1, 5])  # a per-head gate's column; per-key gates (in pieces)
@pytest.mark.parametrize("chunk", [8, 16, 48, 64])
@pytest.mark.parametrize("reverse", [False, True])
def test_prefix_sums_equal_float64_cumulative_sums(width, chunk, reverse):
    """Inclusive sums along the chunk axis of [N,B,H,C,W], forward and reversed, of log decays down
    to -8 a token (a 64-token chunk sums to -512), against numpy's in float64."""
    x = np.random.default_rng(chunk + width).uniform(-8.0, 0.0, size=(2, 3, 2, chunk, width))
    expected = np.flip(np.cumsum(np.flip(x, 3), axis=3), 3) if reverse else np.cumsum(x, axis=3)
    actual = jax.jit(chunked.prefix_sums, static_argnames="reverse")(jnp.asarray(x, jnp.float32), reverse=reverse)
    assert actual.shape == x.shape
    assert np.max(np.abs(np.asarray(actual, np.float64) - expected)) < 1e-6 * np.max(np.abs(expected)) * chunk


def _cumsums_in_and_out_of_conds(jaxpr, inside=False):
    """(cumsums outside every lax.cond, cumsums inside one) of a jaxpr, nested jaxprs included."""
    outside_count, inside_count = 0, 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cumsum":
            inside_count, outside_count = inside_count + inside, outside_count + (not inside)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    out, into = _cumsums_in_and_out_of_conds(inner, inside or eqn.primitive.name == "cond")
                    outside_count, inside_count = outside_count + out, inside_count + into
    return outside_count, inside_count


def test_per_key_gla_branches_over_its_intra_chunk_part_only():
    """XLA compiles both branches of a lax.cond in full: the gates' prefix sums (and the masks and
    state terms beside them) are computed once, outside the choice between the factored and the
    exact intra-chunk form, forward and backward."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32) for _ in range(3))
    log_g = jnp.asarray(rng.uniform(-1.0, 0.0, size=(1, 64, 2, 16)), jnp.float32)

    def loss(q, k, v, log_g):
        out = chunk_gla(q, k, v, log_g=log_g, impl="xla", chunk_size=32)
        return jnp.sum(out * v)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_g).jaxpr
    outside, inside = _cumsums_in_and_out_of_conds(jaxpr)
    assert outside > 0 and inside == 0, (outside, inside)
