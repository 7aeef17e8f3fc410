"""Mamba2 and RetNet against their defining formulas, computed directly from the modules' own
projections: a per-token SSM loop for Mamba2, the decayed quadratic form for retention."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.layers.rotary import apply_rotary
from seqmix.mixers.mamba2 import Mamba2, Mamba2Config
from seqmix.mixers.retnet import MultiScaleRetention, RetNetConfig, retention_log_decays
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")


def test_mamba2_matches_the_ssm_recurrence():
    mixer = Mamba2(MODEL, build(Mamba2Config, {"state_dim": 4}, "mixer"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    inner, n, heads = 32, 4, 2
    z, xbc, dt = jnp.split(mixer.in_proj(x), [inner, 2 * inner + 2 * n], axis=-1)
    xbc, _ = mixer.conv(xbc)
    xs, b, c = np.split(np.asarray(xbc), [inner, inner + n], axis=-1)
    dt = np.asarray(jax.nn.softplus(dt + mixer.dt_bias[...]))
    a = -np.exp(np.asarray(mixer.A_log[...]))
    xs = xs.reshape(2, 9, heads, inner // heads)
    y = np.zeros_like(xs)
    for row in range(2):
        h = np.zeros((heads, n, inner // heads))
        for t in range(9):
            for head in range(heads):
                h[head] = np.exp(a[head] * dt[row, t, head]) * h[head] \
                    + np.outer(b[row, t], dt[row, t, head] * xs[row, t, head])
                y[row, t, head] = c[row, t] @ h[head] + mixer.D[...][head] * xs[row, t, head]
    gated = y.reshape(2, 9, inner) * jax.nn.silu(z)
    assert rel_err(mixer(x)[0], mixer.out_proj(mixer.norm(gated))) < 1e-5


def test_retention_matches_the_decayed_quadratic_form():
    """o_t = sum_{j<=t} gamma_h^(t-j) (q_t . k_j) v_j / sqrt(K), q and k rotated by position."""
    mixer = MultiScaleRetention(MODEL, build(RetNetConfig, {}, "mixer"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 10, 16))
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    q = apply_rotary(mixer.split_heads(mixer.q_proj(x)), positions, MODEL.rope_theta)
    k = apply_rotary(mixer.split_heads(mixer.k_proj(x)), positions, MODEL.rope_theta)
    v = mixer.split_heads(mixer.v_proj(x))
    distance = jnp.arange(10)[:, None] - jnp.arange(10)[None, :]
    decay = jnp.where(distance >= 0, jnp.exp(retention_log_decays(2)[:, None, None] * distance), 0.0)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * decay / np.sqrt(8)
    out = jnp.einsum("bhts,bshd->bthd", scores, v)
    assert rel_err(mixer(x)[0], mixer.output(out, x)) < 1e-5
    np.testing.assert_allclose(np.exp(retention_log_decays(3)), [1 - 2**-5, 1 - 2**-6, 1 - 2**-7], rtol=1e-7)
