"""B'MOJO against a float64 numpy loop that keeps its own memories token by token as the paper
describes them: the SSM's state, a window of the last W tokens, and an eidetic memory of M slots
that each token leaving the window enters when there is room or when its innovation beats the
least one held (which is then evicted). The chunked forward on packed rows, and decoding (a
prefill, then a token at a time) with the cache's elected tokens, equal the loop's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import packed_row, rel_err, rotated, segment_positions, with_random_weights

from seqmix.configuration import ConfigError, build
from seqmix.mixers.bmojo import BMojo, BMojoConfig
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 32, "n_heads": 2}, "model")  # head_dim 16
WINDOW, MEMORY = 4, 3


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def loop(mixer, x, segment_ids, positions):
    """(y [B, T, D] float64, zero at padding; the eidetic memory's positions at each segment's end,
    {(row, segment): sorted positions}; the number of evictions) from the paper's token loop."""
    weight = lambda layer: np.asarray(layer.kernel[...], np.float64)
    x, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
    batch, length, _ = x.shape
    heads, dim = MODEL.n_heads, MODEL.dim_per_head
    q, k, v, c, f = ((x @ weight(layer)).reshape(batch, length, heads, dim)
                     for layer in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.c_proj, mixer.f_proj))
    dt = np.logaddexp(0.0, x @ weight(mixer.dt_proj) + np.asarray(mixer.dt_bias[...], np.float64))
    rate = np.exp(np.asarray(mixer.A_log[...], np.float64))
    q_rot, k_rot = (rotated(a, np.asarray(positions, np.float64), dim, MODEL.rope_theta) for a in (q, k))
    scale = dim ** -0.5
    out, memories, evictions = np.zeros((batch, length, heads, dim)), {}, 0
    for b in range(batch):
        for segment in sorted(set(ids[b].tolist()) - {0}):
            tokens = np.flatnonzero(ids[b] == segment)
            state, prediction, scores, memory = np.zeros((heads, dim, dim)), np.zeros((heads, dim)), {}, []
            for i, t in enumerate(tokens):
                state = (np.exp(-rate * dt[b, t])[:, None, None] * state
                         + dt[b, t][:, None, None] * np.einsum("hk,hv->hkv", k[b, t], v[b, t]))
                readout = np.einsum("hkv,hk->hv", state, c[b, t]) * scale
                scores[t] = np.mean((v[b, t] - prediction) ** 2)  # the innovation: what the state missed
                prediction = readout
                if i >= WINDOW:  # tokens[i - W] leaves the window: kept if among the M most innovative
                    leaving = (scores[tokens[i - WINDOW]], tokens[i - WINDOW])
                    if len(memory) < MEMORY:
                        memory.append(leaving)
                    elif leaving > min(memory):
                        memory[memory.index(min(memory))] = leaving
                        evictions += 1
                seen = list(tokens[max(0, i - WINDOW + 1): i + 1]) + [s for _, s in memory]
                for h in range(heads):
                    weights = softmax(np.append(k_rot[b, seen, h] @ q_rot[b, t, h], q[b, t, h] @ f[b, t, h]) * scale)
                    out[b, t, h] = weights[:-1] @ v[b, seen, h] + weights[-1] * readout[h]
            memories[b, segment] = sorted(int(s) for _, s in memory)
    return out.reshape(batch, length, -1) @ weight(mixer.o_proj), memories, evictions


@nnx.jit
def forward_and_decode(mixer, x, segment_ids, positions):
    """(the forward on the packed rows; decoded, a 13-token prefill then 8 tokens one at a time, of
    row 1 and of row 1's first 18 tokens after 3 of left padding; the cache after them). One
    compilation."""
    forward, _ = mixer(x, segment_ids=segment_ids, positions=positions)
    rows = jnp.stack([x[1], jnp.concatenate([jnp.zeros((3, x.shape[2])), x[1, :18]])])
    real = jnp.array([[1] * 13, [0] * 3 + [1] * 10])
    row_positions = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (2, 21))  # as `extend` counts them
    prefill, cache = mixer(rows[:, :13], segment_ids=real, positions=row_positions[:, :13],
                           cache=mixer.init_cache(2, 21, jnp.float32))

    def step(cache, t):
        token = jax.lax.dynamic_slice_in_dim(rows, t, 1, axis=1)
        y, cache = mixer(token, positions=jax.lax.dynamic_slice_in_dim(row_positions, t, 1, axis=1), cache=cache)
        return cache, y[:, 0]

    cache, steps = jax.lax.scan(step, cache, jnp.arange(13, 21))
    return forward, jnp.concatenate([prefill, jnp.moveaxis(steps, 0, 1)], axis=1), cache


def elected_positions(cache, row):
    held = np.asarray(cache.memory.segment[row]) != 0
    return sorted(np.asarray(cache.memory.position[row])[held].tolist())


def test_forward_and_decoding_equal_the_token_loop_with_its_elections_and_evictions():
    mixer = with_random_weights(BMojo(MODEL, BMojoConfig(window=WINDOW, memory=MEMORY), rngs=nnx.Rngs(0)), seed=1)
    x, segment_ids = packed_row(32)  # documents of 9 and 8 tokens then padding; one of 21 tokens
    positions = jnp.asarray(segment_positions(segment_ids), jnp.int32)
    expected, memories, evictions = loop(mixer, x, segment_ids, positions)
    assert evictions >= 3 and all(len(held) == MEMORY for held in memories.values()), (evictions, memories)
    _, memories_of_18, _ = loop(mixer, x[1:, :18], [[1] * 18], positions[1:, :18])
    forward, decoded, cache = forward_and_decode(mixer, x, segment_ids, positions)
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(forward)[real], expected[real]) < 1e-5
    assert rel_err(decoded[0], expected[1]) < 1e-5  # W = 4: elections in the prefill and in the steps
    assert rel_err(decoded[1, 3:], expected[1, :18]) < 1e-5  # the padding is never elected nor seen
    assert elected_positions(cache, 0) == memories[1, 3]
    assert elected_positions(cache, 1) == [position + 3 for position in memories_of_18[0, 1]]
    assert np.asarray(cache.window.position).tolist() == [[17, 18, 19, 20]] * 2


@pytest.mark.parametrize("key, value", [("window", 0), ("memory", 0), ("chunk_size", 24)])
def test_bad_sizes_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"mixer.{key}"):
        build(BMojoConfig, {key: value}, "mixer")
