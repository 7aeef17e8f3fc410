"""ShortConvolution against a direct per-token sum, across packed segments, padding and cached tails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.layers.short_conv import ShortConvolution

WIDTH, CHANNELS = 4, 6


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def direct(weight, x, segment_ids, activation=True):
    """y[b, t] = act(sum_i w_i x[b, t-i]) over earlier tokens of t's own (nonzero) segment, one
    token at a time. Padding inputs count as zero."""
    batch, length, _ = x.shape
    rows = []
    for b in range(batch):
        out = []
        for t in range(length):
            acc = jnp.zeros(x.shape[-1])
            for i in range(weight.shape[0]):
                s = t - i
                if s >= 0 and segment_ids[b, s] != 0 and segment_ids[b, s] == segment_ids[b, t]:
                    acc = acc + weight[i] * x[b, s]
            out.append(jax.nn.silu(acc) if activation else acc)
        rows.append(jnp.stack(out))
    return jnp.stack(rows)


def make(seed=0, **kwargs):
    conv = ShortConvolution(CHANNELS, WIDTH, rngs=nnx.Rngs(seed), **kwargs)
    x = jax.random.normal(jax.random.key(seed + 1), (2, 13, CHANNELS))
    return conv, x


def test_matches_direct_sum_on_packed_rows_with_padding():
    conv, x = make()
    segment_ids = np.array([[0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0],
                            [3, 3, 3, 3, 3, 3, 0, 4, 4, 5, 5, 5, 5]])
    y, _ = conv(x, segment_ids=jnp.asarray(segment_ids))
    expected = direct(conv.weight[...], x, segment_ids)
    valid = segment_ids != 0
    assert rel_err(np.asarray(y)[valid], np.asarray(expected)[valid]) < 1e-6


def test_gradients_match_direct_sum():
    conv, x = make(activation=False)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 8, [0, 0] + [7] * 11])
    mask = (segment_ids != 0)[..., None]

    def loss(weight, x, fn):
        return jnp.sum(jnp.where(mask, fn(weight, x), 0.0) ** 2)

    graphdef, state = nnx.split(conv)

    def ours(weight, x):
        state["weight"] = weight
        return nnx.merge(graphdef, state)(x, segment_ids=segment_ids)[0]

    weight = conv.weight[...]
    got = jax.grad(loss, argnums=(0, 1))(weight, x, ours)
    want = jax.grad(loss, argnums=(0, 1))(weight, x, lambda w, x: direct(w, x, np.asarray(segment_ids), False))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


@pytest.mark.parametrize("split", [1, 2, 5])
def test_cached_tail_continues_a_sequence(split):
    conv, x = make()
    whole, whole_tail = conv(x)
    first, tail = conv(x[:, :split])
    outputs = [first]
    for t in range(split, x.shape[1]):  # then one token at a time, as decoding does
        y, tail = conv(x[:, t:t + 1], tail=tail)
        outputs.append(y)
    assert rel_err(jnp.concatenate(outputs, axis=1), whole) < 1e-6
    np.testing.assert_array_equal(tail, whole_tail)
    np.testing.assert_array_equal(whole_tail, x[:, -(WIDTH - 1):])


def test_left_padded_prompt_leaves_no_trace():
    """A row padded on the left gives the same outputs and tail as the unpadded prompt."""
    conv, x = make()
    prompt = x[:1, :6]
    padded = jnp.concatenate([jnp.full((1, 7, CHANNELS), 9.0), prompt], axis=1)
    segment_ids = jnp.asarray([[0] * 7 + [1] * 6])
    y_padded, tail_padded = conv(padded, segment_ids=segment_ids)
    y, tail = conv(prompt)
    assert rel_err(y_padded[:, 7:], y) < 1e-6
    np.testing.assert_array_equal(tail_padded, tail)


def test_tail_reaches_only_the_first_segment():
    """A continuation call whose row starts a new document mid-call: the cached tail feeds the
    first segment only."""
    conv, x = make()
    _, tail = conv(x[:, :5])
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])
    y, _ = conv(x[:, 5:], segment_ids=segment_ids, tail=tail)
    fresh, _ = conv(x[:1, 8:])  # the second document of row 0 sees nothing before it
    assert rel_err(y[:1, 3:], fresh) < 1e-6
    continued, _ = conv(x[:, :13])
    assert rel_err(y[1:], continued[1:, 5:]) < 1e-6
    assert rel_err(y[:1, :3], continued[:1, 5:8]) < 1e-6

