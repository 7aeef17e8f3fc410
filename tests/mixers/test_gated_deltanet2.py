"""Gated DeltaNet-2 against a per-token float64 loop of its own recurrence,
S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T (not through the DPLR
form it runs on), on random weights over a packed row with padding (decode: the harness)."""

import numpy as np
from flax import nnx
from mixer_checks import packed_row, recurrence_by_token, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.gated_deltanet2 import GatedDeltaNet2, GatedDeltaNet2Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def gated_deltanet2_loop(mixer, x, segment_ids):
    """y [B, T, D] token by token in float64; padding outputs left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    x64 = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    heads, key_dim, value_dim = mixer.heads, mixer.key_dim, mixer.value_dim
    per_head = lambda z: z.reshape(batch, length, heads, -1)
    conv = lambda c, proj: per_head(np.asarray(c(proj(x), segment_ids=segment_ids)[0], np.float64))
    q, k, v = conv(mixer.q_conv, mixer.q_proj), conv(mixer.k_conv, mixer.k_proj), conv(mixer.v_conv, mixer.v_proj)
    q, k = (a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6) for a in (q, k))
    decay_logits = per_head(x64 @ p(mixer.a_proj.kernel) + p(mixer.dt_bias))
    log_g = -np.exp(p(mixer.A_log))[:, None] * np.log1p(np.exp(decay_logits))
    erase = sigmoid(per_head(x64 @ p(mixer.b_proj.kernel)))
    write = sigmoid(per_head(x64 @ p(mixer.w_proj.kernel)))

    def step(state, b, t, h):
        key = k[b, t, h]
        transition = (np.eye(key_dim) - np.outer(key, erase[b, t, h] * key)) @ np.diag(np.exp(log_g[b, t, h]))
        state = transition @ state + np.outer(key, write[b, t, h] * v[b, t, h])
        return state, state.T @ q[b, t, h] / np.sqrt(key_dim)

    out = recurrence_by_token(segment_ids, heads, (key_dim, value_dim), value_dim, step)
    normed = out / np.sqrt((out * out).mean(-1, keepdims=True) + MODEL.norm_eps) * p(mixer.o_norm.weight)
    gate = per_head(x64 @ p(mixer.g_proj.kernel))
    return (normed * gate * sigmoid(gate)).reshape(batch, length, -1) @ p(mixer.o_proj.kernel)


def test_gated_deltanet2_matches_its_recurrence_on_a_packed_row():
    mixer = with_random_weights(GatedDeltaNet2(MODEL, build(GatedDeltaNet2Config, {}, "mixer"), rngs=nnx.Rngs(0)), 1)
    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    assert rel_err(np.asarray(y)[real], gated_deltanet2_loop(mixer, x, segment_ids)[real]) < 1e-4

