"""Gated DeltaNet-2 against a per-token float64 loop of its own recurrence,
S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T (not through the DPLR
form it runs on), on random weights over a packed row with padding (decode: the harness)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.configuration import build
from seqmix.mixers.gated_deltanet2 import GatedDeltaNet2, GatedDeltaNet2Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def random_gated_deltanet2(seed=0):
    """A mixer whose parameters are all redrawn at scale 0.5, so that every gate matters."""
    mixer = GatedDeltaNet2(MODEL, build(GatedDeltaNet2Config, {}, "mixer"), rngs=nnx.Rngs(seed))
    leaves, treedef = jax.tree.flatten(nnx.state(mixer, nnx.Param))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(mixer, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(key, leaf.shape)
                                                    for key, leaf in zip(keys, leaves)]))
    return mixer


def gated_deltanet2_loop(mixer, x, segment_ids):
    """y [B, T, D] token by token in float64; padding outputs left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    x64, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
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
    out = np.zeros((batch, length, heads, value_dim))
    for b in range(batch):
        for h in range(heads):
            state = np.zeros((key_dim, value_dim))
            for t in range(length):
                if ids[b, t] == 0:
                    continue
                if t == 0 or ids[b, t] != ids[b, t - 1]:
                    state = np.zeros_like(state)
                key = k[b, t, h]
                transition = (np.eye(key_dim) - np.outer(key, erase[b, t, h] * key)) @ np.diag(np.exp(log_g[b, t, h]))
                state = transition @ state + np.outer(key, write[b, t, h] * v[b, t, h])
                out[b, t, h] = state.T @ q[b, t, h] / np.sqrt(key_dim)
    normed = out / np.sqrt((out * out).mean(-1, keepdims=True) + MODEL.norm_eps) * p(mixer.o_norm.weight)
    gate = per_head(x64 @ p(mixer.g_proj.kernel))
    return (normed * gate * sigmoid(gate)).reshape(batch, length, -1) @ p(mixer.o_proj.kernel)


def test_gated_deltanet2_matches_its_recurrence_on_a_packed_row():
    mixer = random_gated_deltanet2()
    x = jax.random.normal(jax.random.key(2), (2, 21, 16))
    segment_ids = jnp.array([[1] * 9 + [2] * 8 + [0] * 4, [3] * 21])
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    assert rel_err(np.asarray(y)[real], gated_deltanet2_loop(mixer, x, segment_ids)[real]) < 1e-4

