"""Helpers shared by the mixers' tests: the relative error, random weights, the packed row the
recurrences are checked on, and the token loop of their float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Two rows of 21 tokens: two documents then padding, and one document filling the row.
PACKED_SEGMENT_IDS = [[1] * 9 + [2] * 8 + [0] * 4, [3] * 21]


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def with_random_weights(mixer, seed: int):
    """The mixer with every parameter redrawn from N(0, 0.5^2), so that every gate, LoRA and
    bias matters."""
    leaves, treedef = jax.tree.flatten(nnx.state(mixer, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(mixer, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(key, leaf.shape)
                                                    for key, leaf in zip(keys, leaves)]))
    return mixer


def packed_row(width: int):
    """(x [2, 21, width] float32, segment_ids [2, 21]) over `PACKED_SEGMENT_IDS`."""
    return jax.random.normal(jax.random.key(2), (2, 21, width)), jnp.array(PACKED_SEGMENT_IDS)


def previous_tokens(x, segment_ids):
    """x_prev [B, T, D] float64: each token's predecessor in its segment, 0 at a segment start and
    on padding (the token shift of the RWKV mixers)."""
    x, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
    previous = np.zeros_like(x)
    same = (ids[:, 1:] != 0) & (ids[:, 1:] == ids[:, :-1])
    previous[:, 1:][same] = x[:, :-1][same]
    return previous


def recurrence_by_token(segment_ids, heads: int, state_shape, value_dim: int, step):
    """out [B, T, H, value_dim] float64 from step(state, b, t, h) -> (state, o_t), run token by
    token with the state zeroed at each segment start; padding outputs stay zero."""
    ids = np.asarray(segment_ids)
    batch, length = ids.shape
    out = np.zeros((batch, length, heads, value_dim))
    for b in range(batch):
        for h in range(heads):
            state = np.zeros(state_shape)
            for t in range(length):
                if ids[b, t] == 0:
                    continue
                if t == 0 or ids[b, t] != ids[b, t - 1]:
                    state = np.zeros(state_shape)
                state, out[b, t, h] = step(state, b, t, h)
    return out


def segment_positions(segment_ids):
    """[B, T] float64: each token's index within its segment (what the model's default positions are)."""
    ids = np.asarray(segment_ids)
    positions = np.zeros(ids.shape)
    for b, row in enumerate(ids):
        for t in range(1, len(row)):
            positions[b, t] = 0 if row[t] != row[t - 1] else positions[b, t - 1] + 1
    return positions


def rotated(x, positions, rotary_dim: int, theta: float):
    """NeoX-style RoPE of x [B, T, H, D] (float64) on its first rotary_dim dims, positions [B, T]."""
    half = rotary_dim // 2
    angle = positions[:, :, None, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    turned = [x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)]
    return np.concatenate(turned + [x[..., rotary_dim:]], axis=-1)


def causal_attention_by_query(q, k, v, segment_ids, scale: float):
    """out [B, T, H, Dv] float64 of softmax attention, query by query, over the keys at or before
    it in its segment; q, k [B, T, H, D], v [B, T, H, Dv] (heads already matched); padding left zero."""
    ids = np.asarray(segment_ids)
    batch, length, heads = q.shape[:3]
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        for t in range(length):
            if ids[b, t] == 0:
                continue
            seen = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
            for h in range(heads):
                logits = np.array([q[b, t, h] @ k[b, s, h] for s in seen]) * scale
                weights = np.exp(logits - logits.max())
                out[b, t, h] = (weights / weights.sum()) @ v[b, seen, h]
    return out
