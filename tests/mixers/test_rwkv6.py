"""RWKV-6 against a per-token loop of its defining recurrence (token shift, bonus, per-key decay)
on random weights, over a packed row with padding; and decode from a right-padded prefill."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import packed_row, previous_tokens, recurrence_by_token, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.rwkv6 import RWKV6, RWKV6Config
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2}, "model")


def random_rwkv6(seed=0):
    """A layer-1 mixer with random weights, so that token shift, LoRAs, decays and bonus all matter."""
    mixer = RWKV6(MODEL, build(RWKV6Config, {"mix_rank": 4, "decay_rank": 4}, "mixer"), layer_index=1,
                  rngs=nnx.Rngs(seed))
    return with_random_weights(mixer, seed + 1)


def rwkv6_loop(mixer, x, segment_ids):
    """y [B, T, D] from x [B, T, D] token by token: x_prev is the previous token of the segment (0
    at its start), o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(w_t) S_{t-1} + k_t v_t^T;
    padding outputs are left at zero."""
    x_prev = jnp.asarray(previous_tokens(x, segment_ids), jnp.float32)
    mixed = mixer.ddlerp(x, x_prev - x)
    r, k, v = (np.asarray(mixer.split_heads(p(mixed[n])), np.float64)
               for n, p in (("r", mixer.r_proj), ("k", mixer.k_proj), ("v", mixer.v_proj)))
    w = np.exp(np.asarray(mixer.log_decay(mixed["w"]), np.float64))
    u = np.asarray(mixer.bonus[...], np.float64)

    def step(state, b, t, h):
        out = r[b, t, h] @ (state + np.outer(u[h] * k[b, t, h], v[b, t, h]))
        return w[b, t, h][:, None] * state + np.outer(k[b, t, h], v[b, t, h]), out

    out = recurrence_by_token(segment_ids, mixer.heads, (mixer.key_dim, mixer.value_dim), mixer.value_dim, step)
    return mixer.output(jnp.asarray(out, jnp.float32), mixed["g"])


def test_rwkv6_matches_its_recurrence_on_a_packed_row():
    mixer = random_rwkv6()
    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    expected = rwkv6_loop(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], np.asarray(expected)[real]) < 1e-4
    lone, _ = mixer(x[:1, 9:17])  # the second document alone, unpacked
    assert rel_err(lone[0], y[0, 9:17]) < 1e-4


def test_rwkv6_decodes_after_a_right_padded_prefill():
    """Row 1's prompt has 4 tokens and 2 padding: decode continues from its last real token."""
    mixer = random_rwkv6(3)
    x = jax.random.normal(jax.random.key(4), (2, 9, 16))
    prompt_ids = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    cache = mixer.init_cache(2, 16, jnp.float32)
    _, cache = mixer(x[:, :6], segment_ids=prompt_ids, cache=cache)
    steps = []
    for t in range(6, 9):
        y, cache = mixer(x[:, t:t + 1], cache=cache)
        steps.append(y)
    steps = jnp.concatenate(steps, axis=1)
    full, _ = mixer(x)
    assert rel_err(steps[0], full[0, 6:]) < 1e-4
    row1, _ = mixer(jnp.concatenate([x[1:, :4], x[1:, 6:]], axis=1))
    assert rel_err(steps[1], row1[0, 4:]) < 1e-4
