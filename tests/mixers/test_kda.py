"""KDA against a per-token float64 loop of its equations (per-key decay from the low-rank gate in
both forms, delta rule, sigmoid-gated RMSNorm output) on random weights, over a packed row with
padding, with as many and with more value heads than q/k heads (fla #624: NaN there)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import packed_row, recurrence_by_token, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers import kda as kda_module
from seqmix.mixers.kda import KDAConfig, KimiDeltaAttention
from seqmix.pallas_kernels.delta import chunk_delta_rule
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def kda_loop(mixer, x, segment_ids, lower_bound):
    """y [B, T, D] token by token in float64; padding outputs left at zero."""
    kernel = lambda layer: np.asarray(layer.kernel[...], np.float64)
    f64 = lambda a: np.asarray(a, np.float64)
    x64 = f64(x)
    batch, length, _ = x.shape
    heads, dim = mixer.heads, mixer.key_dim
    conv = lambda c, p: f64(c(p(x), segment_ids=segment_ids)[0]).reshape(batch, length, -1, dim)
    q, k, v = conv(mixer.q_conv1d, mixer.q_proj), conv(mixer.k_conv1d, mixer.k_proj), conv(mixer.v_conv1d,
                                                                                            mixer.v_proj)
    q, k = (a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6) for a in (q, k))
    beta = 1 / (1 + np.exp(-x64 @ kernel(mixer.b_proj)))
    f = (x64 @ kernel(mixer.f_a_proj) @ kernel(mixer.f_b_proj) + f64(mixer.dt_bias[...])).reshape(
        batch, length, heads, dim)
    rate = np.exp(f64(mixer.A_log[...]))[:, None]
    if lower_bound is None:
        log_g = -rate * np.log1p(np.exp(f))
    else:
        log_g = lower_bound / (1 + np.exp(-rate * f))
    group = heads // q.shape[2]

    def step(state, b, t, h):
        key = k[b, t, h // group]
        state = np.exp(log_g[b, t, h])[:, None] * state
        state = state + beta[b, t, h] * np.outer(key, v[b, t, h] - state.T @ key)
        return state, state.T @ q[b, t, h // group] / np.sqrt(dim)

    out = recurrence_by_token(segment_ids, heads, (dim, dim), dim, step)
    normed = out / np.sqrt((out * out).mean(-1, keepdims=True) + MODEL.norm_eps) * f64(mixer.o_norm.weight[...])
    gate = 1 / (1 + np.exp(-(x64 @ kernel(mixer.g_a_proj) @ kernel(mixer.g_b_proj)).reshape(out.shape)))
    return (normed * gate).reshape(batch, length, -1) @ kernel(mixer.o_proj)


@pytest.mark.parametrize("options", [{}, {"gate_lower_bound": -5.0, "num_v_heads": 4},
                                     {"num_heads": 1, "head_dim": 6, "num_v_heads": 3}],
                         ids=["softplus_gate", "lower_bound_grouped_value_heads", "own_head_geometry"])
def test_kda_matches_its_recurrence_on_a_packed_row(options):
    mixer = with_random_weights(KimiDeltaAttention(MODEL, build(KDAConfig, options, "mixer"), rngs=nnx.Rngs(0)), 1)
    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    assert np.all(np.isfinite(np.asarray(y)))
    expected = kda_loop(mixer, x, segment_ids, options.get("gate_lower_bound"))
    assert rel_err(np.asarray(y)[real], expected[real]) < 1e-4


def test_kda_trains_through_steep_keys_as_through_its_reference(monkeypatch):
    """Under a lower bound of -5 nats a token, keys whose gate saturates (every fourth, by its
    dt_bias) decay by more than 60 nats in a 16-token half chunk, which the xla path takes
    elementwise, a few keys at a time (`per_key_decay`): the mixer's loss and every parameter's
    gradient through the xla path match those through the token-by-token reference."""
    mixer = with_random_weights(KimiDeltaAttention(MODEL, build(KDAConfig, {"gate_lower_bound": -5.0}, "mixer"),
                                                   rngs=nnx.Rngs(0)), 3)
    keys = np.arange(mixer.dt_bias[...].size).reshape(mixer.dt_bias[...].shape)
    mixer.dt_bias[...] = jnp.asarray(np.where(keys % 4 == 0, 6.0, -1.0), jnp.float32)
    x = jax.random.normal(jax.random.key(4), (2, 96, MODEL.d_model))
    spans = np.asarray(mixer.log_decay(x)).reshape(2, 6, 16, mixer.heads, -1).sum(axis=2)
    assert 0 < np.mean(spans < -60) < 0.5  # some keys steep, not all
    weights = jax.random.normal(jax.random.key(5), x.shape)
    graph, params, rest = nnx.split(mixer, nnx.Param, ...)

    def loss(params):
        y, _ = nnx.merge(graph, params, rest)(x)
        return jnp.sum(y * weights)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(kda_module, "chunk_delta_rule", functools.partial(chunk_delta_rule, impl="reference"))
    expected_value, expected_grads = jax.jit(jax.value_and_grad(loss))(params)
    assert rel_err(value, expected_value) < 1e-4
    expected = dict(nnx.to_flat_state(expected_grads))
    for path, grad in nnx.to_flat_state(grads):
        assert rel_err(grad[...], expected[path][...]) < 1e-4, path
