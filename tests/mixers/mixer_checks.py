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


def selective_block_by_token(mixer, x, segment_ids, advance):
    """y [B, T, D] float64 of Mamba's block (Mamba-1, Longhorn) from the module's parameters, token
    by token: x, z = x W_in; x = silu(causal depthwise conv of x within its segment + bias);
    dt, B, C = x W_x; state h [E, N] advanced by advance(h, dt W_dt + b_dt, B, x) (zeroed at each
    segment start); y = (h C + D x) * silu(z); out = y W_out. Padding tokens stay zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    silu = lambda a: a / (1 + np.exp(-a))
    ids = np.asarray(segment_ids)
    xz = np.asarray(x, np.float64) @ p(mixer.in_proj.kernel)
    values, z = np.split(xz, 2, axis=-1)
    weight, bias = p(mixer.conv1d.weight), p(mixer.conv1d.bias)
    rank, state_dim = mixer.dt_proj.kernel.shape[0], mixer.state_dim
    out = np.zeros((*ids.shape, mixer.out_proj.kernel.shape[1]))
    for b in range(ids.shape[0]):
        h = np.zeros((values.shape[-1], state_dim))
        for t in range(ids.shape[1]):
            if ids[b, t] == 0:
                continue
            if t > 0 and ids[b, t] != ids[b, t - 1]:
                h = np.zeros_like(h)
            taps = [weight[i] * values[b, t - i] for i in range(len(weight))
                    if t - i >= 0 and ids[b, t - i] == ids[b, t]]
            u = silu(sum(taps) + bias)
            dt, k, q = np.split(u @ p(mixer.x_proj.kernel), [rank, rank + state_dim])
            h = advance(h, dt @ p(mixer.dt_proj.kernel) + p(mixer.dt_proj.bias), k, u)
            out[b, t] = ((h @ q + p(mixer.D) * u) * silu(z[b, t])) @ p(mixer.out_proj.kernel)
    return out
