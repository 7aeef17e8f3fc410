"""RWKV-7 against a per-token float64 loop of its equations (token shift, decay, in-context learning
rate, removal and replacement keys, the DPLR state update, group norm, bonus, gate), computed from
the parameters alone, on random weights over a packed row with padding."""

import numpy as np
from flax import nnx
from mixer_checks import packed_row, previous_tokens, recurrence_by_token, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.rwkv7 import BRANCHES, RWKV7, RWKV7Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def rwkv7_loop(mixer, x, segment_ids):
    """y [B, T, D] token by token in float64; padding outputs left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    lora = lambda m, z, act: act(z @ p(m.down.kernel)) @ p(m.up.kernel) + (0 if m.up.bias is None else p(m.up.bias))
    x64, x_prev = np.asarray(x, np.float64), previous_tokens(x, segment_ids)
    batch, length, _ = x.shape
    heads, dim = mixer.heads, mixer.key_dim
    mixed = {name: x64 + p(getattr(mixer, f"x_{name}")) * (x_prev - x64) for name in BRANCHES}
    per_head = lambda z: z.reshape(batch, length, heads, dim)
    r = per_head(mixed["r"] @ p(mixer.r_proj.kernel))
    k = mixed["k"] @ p(mixer.k_proj.kernel)
    v = per_head(mixed["v"] @ p(mixer.v_proj.kernel))
    w = per_head(np.exp(-np.exp(-0.5) * sigmoid(lora(mixer.w_lora, mixed["w"], np.tanh))))
    rate = sigmoid(lora(mixer.a_lora, mixed["a"], lambda z: z))
    kappa = per_head(k * p(mixer.k_k))
    kappa_hat = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
    k_new = per_head(k * (1 + (rate - 1) * p(mixer.k_a)))
    rate = per_head(rate)

    def step(state, b, t, h):
        removal = kappa_hat[b, t, h]
        transition = np.diag(w[b, t, h]) - np.outer(rate[b, t, h] * removal, removal)
        state = transition @ state + np.outer(k_new[b, t, h], v[b, t, h])
        return state, state.T @ r[b, t, h]

    out = recurrence_by_token(segment_ids, heads, (dim, dim), dim, step)
    mean = out.mean(-1, keepdims=True)
    normed = (out - mean) / np.sqrt(((out - mean) ** 2).mean(-1, keepdims=True) + mixer.g_norm.eps)
    normed = normed.reshape(batch, length, -1) * p(mixer.g_norm.weight) + p(mixer.g_norm.bias)
    bonus = ((r * k_new * p(mixer.r_k)).sum(-1, keepdims=True) * v).reshape(batch, length, -1)
    gate = lora(mixer.g_lora, mixed["g"], sigmoid)
    return ((normed + bonus) * gate) @ p(mixer.o_proj.kernel)


def test_rwkv7_matches_its_recurrence_on_a_packed_row():
    config = build(RWKV7Config, {"decay_rank": 4, "learning_rate_rank": 4, "gate_rank": 4}, "mixer")
    mixer = with_random_weights(RWKV7(MODEL, config, layer_index=1, rngs=nnx.Rngs(0)), 1)
    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    expected = rwkv7_loop(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], expected[real]) < 1e-4
    lone, _ = mixer(x[:1, 9:17])  # the second document alone, unpacked
    assert rel_err(lone[0], y[0, 9:17]) < 1e-4
