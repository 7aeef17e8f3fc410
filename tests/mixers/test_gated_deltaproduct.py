"""Gated DeltaProduct's recurrence (n_h delta steps per token on the interleaved sequence) against
an explicit product of generalized Householder factors, token by token in float64: on a packed
row with padding, from an initial state, with grouped value heads; and its decode step."""

import jax
import jax.numpy as jnp
import numpy as np
from mixer_checks import rel_err

from seqmix.mixers.gated_deltaproduct import householder_product_rule, householder_product_step


def random_tokens(seed, batch=2, length=23, steps=3, key_heads=1, heads=2, key_dim=4, value_dim=5):
    keys = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return dict(
        q=jax.random.normal(keys[0], (batch, length, key_heads, key_dim)),
        k=unit(jax.random.normal(keys[1], (batch, length, steps, key_heads, key_dim))),
        v=jax.random.normal(keys[2], (batch, length, steps, heads, value_dim)),
        beta=2 * jax.random.uniform(keys[3], (batch, length, steps, heads)),  # (0, 2): reflections too
        log_a=-jax.random.uniform(keys[4], (batch, length, heads), maxval=0.5),
    ), jax.random.normal(keys[5], (batch, heads, key_dim, value_dim))


def product_loop(tokens, initial_state, segment_ids):
    """o_t = S_t^T q_t / sqrt(K) with S_t = prod_j (I - beta_j k_j k_j^T) a_t S_{t-1} + the
    writes, one Householder factor at a time, S [K, V] per value head (head h reads q/k head
    h // (H / Hk)); the state resets to zero at each segment start after the first, padding skipped."""
    q, k, v, beta, log_a = (np.asarray(tokens[n], np.float64) for n in ("q", "k", "v", "beta", "log_a"))
    ids = np.asarray(segment_ids)
    batch, length, steps, heads, _ = v.shape
    group = heads // q.shape[2]
    out = np.zeros((batch, length, heads, v.shape[-1]))
    finals = np.zeros(initial_state.shape)
    for b in range(batch):
        for h in range(heads):
            state, segment = np.asarray(initial_state[b, h], np.float64), ids[b, 0]
            for t in range(length):
                if ids[b, t] == 0:
                    continue
                if ids[b, t] != segment:
                    state, segment = np.zeros_like(state), ids[b, t]
                state = np.exp(log_a[b, t, h]) * state
                for j in range(steps):
                    key = k[b, t, j, h // group]
                    householder = np.eye(len(key)) - beta[b, t, j, h] * np.outer(key, key)
                    state = householder @ state + beta[b, t, j, h] * np.outer(key, v[b, t, j, h])
                out[b, t, h] = state.T @ q[b, t, h // group] / np.sqrt(q.shape[-1])
            finals[b, h] = state
    return out, finals


def test_householder_product_rule_equals_the_product_of_factors_on_a_packed_row():
    tokens, initial_state = random_tokens(0)
    segment_ids = jnp.array([[1] * 10 + [2] * 9 + [0] * 4, [3] * 23])
    out, final_state = householder_product_rule(**tokens, segment_ids=segment_ids, initial_state=initial_state,
                                                output_final_state=True)
    expected, expected_final = product_loop(tokens, initial_state, segment_ids)
    assert rel_err(out, expected) < 1e-4
    assert rel_err(final_state, expected_final) < 1e-4


def test_householder_product_step_continues_the_chunked_rule():
    tokens, initial_state = random_tokens(1, length=9)
    out, state = householder_product_rule(**jax.tree.map(lambda x: x[:, :8], tokens), initial_state=initial_state,
                                          output_final_state=True)
    last, state = householder_product_step(**jax.tree.map(lambda x: x[:, 8], tokens), state=state)
    expected, expected_final = product_loop(tokens, initial_state, jnp.ones((2, 9), jnp.int32))
    assert rel_err(jnp.concatenate([out, last[:, None]], axis=1), expected) < 1e-4
    assert rel_err(state, expected_final) < 1e-4
