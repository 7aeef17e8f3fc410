"""GLA and HGRN2 against a per-token loop of their defining recurrences, with q, k, v and gates
computed directly from the modules' own projections."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.mixers.gla import GatedLinearAttention, GLAConfig
from seqmix.mixers.hgrn2 import HGRN2, HGRN2Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")


def gated_recurrence(q, k, v, log_g, scale):
    """S_t = diag(exp(log_g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t, per row and head."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, np.exp(log_g)))
    out = np.zeros(v.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            state = np.zeros((k.shape[-1], v.shape[-1]))
            for t in range(q.shape[1]):
                state = g[b, t, h][:, None] * state + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = scale * q[b, t, h] @ state
    return jnp.asarray(out, jnp.float32)


def test_gla_matches_its_recurrence():
    mixer = GatedLinearAttention(MODEL, build(GLAConfig, {}, "mixer"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    q, k, v = (mixer.split_heads(p(x)) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    log_g = jax.nn.log_sigmoid(mixer.split_heads(mixer.gate_up(mixer.gate_down(x)))) / 16.0
    assert mixer.key_dim == 4 and float(jnp.min(log_g)) > -1.0  # logsigmoid / 16: decays near 1
    expected = gated_recurrence(q, k, v, log_g, mixer.key_dim ** -0.5)
    assert rel_err(mixer(x)[0], mixer.output(expected, x)) < 1e-5


def test_hgrn2_ties_keys_to_the_forget_gate():
    mixer = HGRN2(MODEL, build(HGRN2Config, {}, "mixer"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 9, 16))
    forget = jax.nn.sigmoid(mixer.split_heads(mixer.f_proj(x)))
    expected = gated_recurrence(mixer.split_heads(mixer.q_proj(x)), 1.0 - forget, mixer.split_heads(mixer.i_proj(x)),
                                jnp.log(forget), 1.0)
    assert rel_err(mixer(x)[0], mixer.output(expected, x)) < 1e-5
