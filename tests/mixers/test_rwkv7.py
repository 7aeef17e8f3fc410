"""RWKV-7 against a per-token float64 loop of its equations (token shift, decay, in-context learning
rate, removal and replacement keys, the DPLR state update, group norm, bonus, gate), computed from
the parameters alone, on random weights over a packed row with padding."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.configuration import build
from seqmix.mixers.rwkv7 import BRANCHES, RWKV7, RWKV7Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def random_rwkv7(seed=0):
    """A layer-1 mixer whose parameters are all redrawn at scale 0.5."""
    mixer = RWKV7(MODEL, build(RWKV7Config, {"decay_rank": 4, "learning_rate_rank": 4, "gate_rank": 4}, "mixer"),
                  layer_index=1, rngs=nnx.Rngs(seed))
    leaves, treedef = jax.tree.flatten(nnx.state(mixer, nnx.Param))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(mixer, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(key, leaf.shape)
                                                    for key, leaf in zip(keys, leaves)]))
    return mixer


def rwkv7_loop(mixer, x, segment_ids):
    """y [B, T, D] token by token in float64; padding outputs left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    lora = lambda m, z, act: act(z @ p(m.down.kernel)) @ p(m.up.kernel) + (0 if m.up.bias is None else p(m.up.bias))
    x64, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
    batch, length, _ = x.shape
    heads, dim = mixer.heads, mixer.key_dim
    x_prev = np.zeros_like(x64)
    for b in range(batch):
        for t in range(1, length):
            if ids[b, t] != 0 and ids[b, t - 1] == ids[b, t]:
                x_prev[b, t] = x64[b, t - 1]
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
    out = np.zeros((batch, length, heads, dim))
    for b in range(batch):
        for h in range(heads):
            state = np.zeros((dim, dim))
            for t in range(length):
                if ids[b, t] == 0:
                    continue
                if t == 0 or ids[b, t] != ids[b, t - 1]:
                    state = np.zeros_like(state)
                removal = kappa_hat[b, t, h]
                transition = np.diag(w[b, t, h]) - np.outer(rate[b, t, h] * removal, removal)
                state = transition @ state + np.outer(k_new[b, t, h], v[b, t, h])
                out[b, t, h] = state.T @ r[b, t, h]
    mean = out.mean(-1, keepdims=True)
    normed = (out - mean) / np.sqrt(((out - mean) ** 2).mean(-1, keepdims=True) + mixer.g_norm.eps)
    normed = normed.reshape(batch, length, -1) * p(mixer.g_norm.weight) + p(mixer.g_norm.bias)
    bonus = ((r * k_new * p(mixer.r_k)).sum(-1, keepdims=True) * v).reshape(batch, length, -1)
    gate = lora(mixer.g_lora, mixed["g"], sigmoid)
    return ((normed + bonus) * gate) @ p(mixer.o_proj.kernel)


def test_rwkv7_matches_its_recurrence_on_a_packed_row():
    mixer = random_rwkv7()
    x = jax.random.normal(jax.random.key(2), (2, 21, 16))
    segment_ids = jnp.array([[1] * 9 + [2] * 8 + [0] * 4, [3] * 21])
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    expected = rwkv7_loop(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], expected[real]) < 1e-4
    lone, _ = mixer(x[:1, 9:17])  # the second document alone, unpacked
    assert rel_err(lone[0], y[0, 9:17]) < 1e-4
