"""`local_linear_attention`: the reference against each query's weighted least squares solved
directly in float64, and the blockwise `xla` path (8-token blocks: 3 query and 3 key blocks over 21
tokens, the last padded) against the reference, outputs and gradients, on packed rows (the mixer
harness, tests/mixers/test_mixers.py, checks the mixer's decode, packing and training)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import relative_error

from seqmix.pallas_kernels.local_linear_attention import local_linear_attention

SCALE = 0.5  # 1 / sqrt(D) for D = 4
SEGMENT_IDS = jnp.array([[1] * 9 + [2] * 8 + [0] * 4, [3] * 21])


def estimates_by_query(q, k, v, segment_ids, ridge: float):
    """(local linear, softmax average), each [B, T, H, Dv] float64: for each query, over the keys at
    or before it in its segment with weights p = softmax(q.k * SCALE), (b, W) = argmin sum_j p_j
    ||v_j - b - W (k_j - q)||^2 + ridge ||W||^2 by lstsq on the sqrt(p)-weighted rows stacked over
    sqrt(ridge) rows for W (the estimate is b), and sum_j p_j v_j. Padding left zero."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    ids = np.asarray(segment_ids)
    batch, length, heads, dim = q.shape
    local, average = np.zeros((2, batch, length, heads, v.shape[-1]))
    for b, t in zip(*np.nonzero(ids)):
        seen = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
        for h in range(heads):
            logits = k[b, seen, h] @ q[b, t, h] * SCALE
            p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            design = np.concatenate([np.ones((len(seen), 1)), k[b, seen, h] - q[b, t, h]], axis=1)
            design = np.concatenate([np.sqrt(p)[:, None] * design,
                                     np.concatenate([np.zeros((dim, 1)), np.sqrt(ridge) * np.eye(dim)], axis=1)])
            target = np.concatenate([np.sqrt(p)[:, None] * v[b, seen, h], np.zeros((dim, v.shape[-1]))])
            local[b, t, h] = np.linalg.lstsq(design, target, rcond=None)[0][0]
            average[b, t, h] = p @ v[b, seen, h]
    return local, average


@functools.partial(jax.jit, static_argnames=("ridge", "impl"))
def estimate_and_gradients(q, k, v, ridge, impl):
    """The estimate and the gradients of a loss of it with respect to q, k and v."""
    index = jnp.arange(q.shape[1])
    same_segment = (SEGMENT_IDS[:, :, None] == SEGMENT_IDS[:, None, :]) & (SEGMENT_IDS != 0)[:, None]
    mask = (index[:, None] >= index) & same_segment
    estimate = lambda q, k, v: local_linear_attention(q, k, v, mask, scale=SCALE, ridge=ridge, block_size=8, impl=impl)
    loss = lambda *args: jnp.sum(jnp.sin(estimate(*args)) * (SEGMENT_IDS != 0)[..., None, None])
    return estimate(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def inputs(values=None):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k = jax.random.normal(keys[0], (2, 21, 2, 4)), jax.random.normal(keys[1], (2, 21, 2, 4))
    return q, k, jax.random.normal(keys[2], (2, 21, 2, 3)) if values is None else values(k)


def test_reference_solves_each_querys_weighted_least_squares_and_xla_equals_it():
    q, k, v = inputs()
    expected, (out, gradients) = estimate_and_gradients(q, k, v, 0.3, "reference"), estimate_and_gradients(
        q, k, v, 0.3, "xla")
    assert relative_error(expected[0], estimates_by_query(q, k, v, SEGMENT_IDS, ridge=0.3)[0]) < 1e-4
    assert relative_error(out, expected[0]) < 1e-4
    assert np.all(np.asarray(out)[np.asarray(SEGMENT_IDS) == 0] == 0)  # padding sees nothing
    for name, actual, wanted in zip("qkv", gradients, expected[1]):
        assert np.abs(actual).max() > 0 and relative_error(actual, wanted) < 1e-4, name


def test_interpolates_softmax_attention_and_an_exact_linear_fit():
    """A huge ridge pins the slope at 0: softmax attention. Values an affine function of the keys
    are fitted exactly once a query sees more keys than dimensions (softmax attention, a local
    average, misses them): out = A q + c."""
    q, k, v = inputs()
    softmax = estimates_by_query(q, k, v, SEGMENT_IDS, ridge=1.0)[1]
    assert relative_error(estimate_and_gradients(q, k, v, 1e7, "xla")[0], softmax) < 1e-4
    slope, bias = jax.random.normal(jax.random.key(5), (4, 3)), jnp.array([0.5, -1.0, 2.0])
    q, k, v = inputs(values=lambda keys: keys @ slope + bias)
    out = np.asarray(estimate_and_gradients(q, k, v, 1e-6, "xla")[0])
    exact = np.asarray(q @ slope + bias)
    fitted = np.zeros(SEGMENT_IDS.shape, bool)  # queries with at least 6 keys (> D + 1) before them
    fitted[0, 5:9], fitted[0, 14:17], fitted[1, 5:] = True, True, True
    assert relative_error(out[fitted], exact[fitted]) < 1e-3
    averaged = estimates_by_query(q, k, v, SEGMENT_IDS, ridge=1.0)[1]
    assert relative_error(averaged[fitted], exact[fitted]) > 0.1


def test_refuses_mismatched_inputs_by_name():
    q, k, v = inputs()
    mask = jnp.ones((2, 21, 21), bool)
    with pytest.raises(ValueError, match="mask must be bool"):
        local_linear_attention(q, k, v, mask[:, :20], scale=SCALE, ridge=1.0)
    with pytest.raises(ValueError, match="ridge must be positive"):
        local_linear_attention(q, k, v, mask, scale=SCALE, ridge=0.0)
