"""`causal_conv`: the direct reference against a float64 numpy loop written from the definition,
and the FFT path (one FFT per row; the divide and conquer over blocks on packed rows) against the
reference, outputs and gradients of x and the filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import packed_segments, relative_error

from seqmix.pallas_kernels.fftconv import causal_conv


def conv_by_loop(x, filters, segment_ids):
    """float64 y [B,T,D]: for each real token, taps walking back while the tokens stay in its
    segment (padding inside a segment reads zero and takes its slot; another id ends it)."""
    x, filters = np.asarray(x, np.float64), np.asarray(filters, np.float64)
    batch, length, _ = x.shape
    ids = np.ones((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
    y = np.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            if ids[b, t] == 0:
                continue
            for j in range(min(filters.shape[1], t + 1)):
                if ids[b, t - j] not in (0, ids[b, t]):
                    break
                if ids[b, t - j] != 0:
                    y[b, t] += filters[:, j] * x[b, t - j]
    return y


# T = 97: odd, and two levels of blocks above the 32-token direct blocks (padded to 128).
@pytest.mark.parametrize("taps, packed", [(97, True), (40, True), (97, False)])
def test_fft_path_equals_reference_equals_loop(taps, packed):
    batch, length, channels = 2, 97, 5
    x = jax.random.normal(jax.random.key(0), (batch, length, channels))
    filters = jax.random.normal(jax.random.key(1), (channels, taps)) / np.sqrt(np.arange(1, taps + 1))
    segment_ids = packed_segments(np.random.default_rng(taps), batch, length) if packed else None
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    @jax.jit
    def both(x, filters):
        def out_and_grads(impl):
            y, pullback = jax.vjp(lambda x, f: causal_conv(x, f, segment_ids=segment_ids, impl=impl), x, filters)
            return y, pullback(cotangent)
        return out_and_grads("xla"), out_and_grads("reference")

    (y, grads), (y_ref, grads_ref) = both(x, filters)
    expected = conv_by_loop(x, filters, segment_ids)
    assert relative_error(y_ref, expected) < 1e-5
    assert relative_error(y, y_ref) < 1e-4
    for name, grad, grad_ref in zip(("dx", "dfilters"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 1e-4, name
    if packed:
        assert np.all(np.asarray(y)[np.asarray(segment_ids) == 0] == 0.0)


def test_bfloat16_input_is_computed_in_float32_and_returned_in_bfloat16():
    x = jax.random.normal(jax.random.key(0), (1, 45, 3)).astype(jnp.bfloat16)
    filters = jax.random.normal(jax.random.key(1), (3, 45)) / 45
    y = causal_conv(x, filters)
    assert y.dtype == jnp.bfloat16
    assert relative_error(y, conv_by_loop(x.astype(jnp.float32), filters, None)) < 1e-2


def test_bad_arguments_are_refused():
    x = jnp.zeros((1, 8, 3))
    with pytest.raises(ValueError, match="filters must be"):
        causal_conv(x, jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="segment_ids must be"):
        causal_conv(x, jnp.zeros((3, 8)), segment_ids=jnp.zeros((1, 7), jnp.int32))
