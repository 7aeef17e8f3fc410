"""Local linear attention's blockwise estimate against each query's weighted least squares solved
directly in float64, on packed rows with blocks smaller than the row (the shared harness,
tests/mixers/test_mixers.py, checks decode, packing and training of the mixer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_checks import PACKED_SEGMENT_IDS, causal_attention_by_query, rel_err

from seqmix.configuration import ConfigError, build
from seqmix.mixers.attention import attention_mask
from seqmix.mixers.local_linear_attention import LocalLinearAttentionConfig, local_linear_attention

SCALE = 0.5  # 1 / sqrt(D) for D = 4


def local_linear_by_query(q, k, v, segment_ids, ridge: float):
    """out [B, T, H, Dv] float64: for each query, (b, W) = argmin sum_j p_j ||v_j - b - W (k_j - q)||^2
    + ridge ||W||^2 over the keys j at or before it in its segment (p: softmax of q.k * SCALE), by
    lstsq on the sqrt(p)-weighted rows stacked over sqrt(ridge) rows for W; the output is b."""
    ids = np.asarray(segment_ids)
    batch, length, heads, dim = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        for t in range(length):
            if ids[b, t] == 0:
                continue
            seen = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
            for h in range(heads):
                logits = k[b, seen, h] @ q[b, t, h] * SCALE
                root_p = np.sqrt(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
                design = np.concatenate([np.ones((len(seen), 1)), k[b, seen, h] - q[b, t, h]], axis=1)
                design = np.concatenate([root_p[:, None] * design,
                                         np.concatenate([np.zeros((dim, 1)), np.sqrt(ridge) * np.eye(dim)], axis=1)])
                target = np.concatenate([root_p[:, None] * v[b, seen, h], np.zeros((dim, v.shape[-1]))])
                out[b, t, h] = np.linalg.lstsq(design, target, rcond=None)[0][0]
    return out


@jax.jit
def estimate_and_gradients(q, k, v, segment_ids, ridge):
    """The estimate with 8-token blocks (3 query and 3 key blocks over 21 tokens, the last padded)
    and the gradients of a loss of it with respect to q, k and v."""
    index = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), segment_ids.shape)
    mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids)
    estimate = lambda q, k, v: local_linear_attention(q, k, v, mask, scale=SCALE, ridge=ridge, block_size=8)
    loss = lambda *args: jnp.sum(jnp.sin(estimate(*args)) * (segment_ids != 0)[..., None, None])
    return estimate(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def inputs(values=None):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k = jax.random.normal(keys[0], (2, 21, 2, 4)), jax.random.normal(keys[1], (2, 21, 2, 4))
    v = jax.random.normal(keys[2], (2, 21, 2, 3)) if values is None else values(k)
    return q, k, v, jnp.array(PACKED_SEGMENT_IDS)


def test_blockwise_estimate_solves_each_querys_weighted_least_squares():
    q, k, v, segment_ids = inputs()
    out, gradients = estimate_and_gradients(q, k, v, segment_ids, 0.3)
    expected = local_linear_by_query(*(np.asarray(a, np.float64) for a in (q, k, v)), segment_ids, ridge=0.3)
    assert rel_err(out, expected) < 1e-4
    assert np.all(np.asarray(out)[np.asarray(segment_ids) == 0] == 0)  # padding sees nothing
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in gradients)


def test_interpolates_softmax_attention_and_an_exact_linear_fit():
    """A huge ridge pins the slope at 0: softmax attention. Values an affine function of the keys
    are fitted exactly once a query sees more keys than dimensions (softmax attention, a local
    average, misses them): out = A q + c."""
    q, k, v, segment_ids = inputs()
    softmax = causal_attention_by_query(*(np.asarray(a, np.float64) for a in (q, k, v)), segment_ids, SCALE)
    assert rel_err(estimate_and_gradients(q, k, v, segment_ids, 1e7)[0], softmax) < 1e-4
    slope, bias = jax.random.normal(jax.random.key(5), (4, 3)), jnp.array([0.5, -1.0, 2.0])
    q, k, v, segment_ids = inputs(values=lambda keys: keys @ slope + bias)
    out = np.asarray(estimate_and_gradients(q, k, v, segment_ids, 1e-6)[0])
    exact = np.asarray(q @ slope + bias)
    fitted = np.zeros(segment_ids.shape, bool)  # queries with at least 6 keys (> D + 1) before them
    fitted[0, 5:9], fitted[0, 14:17], fitted[1, 5:] = True, True, True
    assert rel_err(out[fitted], exact[fitted]) < 1e-3
    averaged = causal_attention_by_query(*(np.asarray(a, np.float64) for a in (q, k, v)), segment_ids, SCALE)
    assert rel_err(averaged[fitted], exact[fitted]) > 0.1


def test_config_refuses_a_window_and_a_non_positive_ridge():
    with pytest.raises(ConfigError, match="mixer.sliding_window"):
        build(LocalLinearAttentionConfig, {"sliding_window": 8}, "mixer").validate("mixer")
    with pytest.raises(ConfigError, match="mixer.ridge"):
        build(LocalLinearAttentionConfig, {"ridge": 0.0}, "mixer").validate("mixer")
