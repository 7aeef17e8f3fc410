"""S4D beyond the mixer harness: its two initialisations, and the convolution form (training, and
a prefill from a cached state) against the paper's recurrence run token by token in float64 numpy,
on packed rows with padding before, inside and after segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import rel_err
from scipy.special import erf

from seqmix.configuration import build
from seqmix.mixers.s4d import S4D, S4DCache, S4DConfig
from seqmix.models.config import ModelConfig

WIDTH, STATE_DIM = 6, 8
# Row 0: two documents then padding; row 1: left padding, then one document with padding inside.
SEGMENT_IDS = np.array([[1] * 9 + [2] * 8 + [0] * 4, [0] * 3 + [3] * 6 + [0] * 2 + [3] * 10])


def by_recurrence(mixer, x, initial_state):
    """float64 (out [B, T, D], final state [B, D, N/2] complex) from the paper's equations: ZOH
    dA = exp(dt A), dB = (dA - 1) / A; s_t = dA s_{t-1} + dB u_t, y_t = 2 Re(C s_t) + D u_t, the
    state reset at each segment start (initial_state before the row's first), padding skipped;
    out = GLU(GELU(y) W_out)."""
    f64 = lambda a: np.asarray(a, np.float64)
    a = -np.exp(f64(mixer.log_neg_real_a[...])) + 1j * f64(mixer.imag_a[...])
    dt = np.exp(f64(mixer.log_dt[...]))[:, None]
    da = np.exp(dt * a)
    db = (da - 1) / a
    c = f64(mixer.c[...])[..., 0] + 1j * f64(mixer.c[...])[..., 1]
    d, w_out = f64(mixer.d[...]), f64(mixer.out_proj.kernel[...])
    x = f64(x)
    out, final = np.zeros(x.shape), np.array(initial_state, np.complex128)
    for b in range(x.shape[0]):
        state, previous = final[b], None
        for t in range(x.shape[1]):
            if SEGMENT_IDS[b, t] == 0:
                continue
            if previous is not None and SEGMENT_IDS[b, t] != previous:
                state = np.zeros_like(state)
            previous = SEGMENT_IDS[b, t]
            state = da * state + db * x[b, t][:, None]
            y = 2 * np.sum(c * state, axis=-1).real + d * x[b, t]
            z = 0.5 * y * (1 + erf(y / np.sqrt(2))) @ w_out
            out[b, t] = z[:WIDTH] / (1 + np.exp(-z[WIDTH:]))
        final[b] = state
    return out, final


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_convolution_form_equals_the_recurrence_on_packed_rows_with_and_without_a_cached_state(init):
    model = build(ModelConfig, {"d_model": WIDTH, "n_heads": 1, "init_std": 0.5}, "model")
    mixer = S4D(model, build(S4DConfig, {"state_dim": STATE_DIM, "init": init, "dt_min": 0.01, "dt_max": 0.5},
                             "mixer"), rngs=nnx.Rngs(0))
    n = np.arange(STATE_DIM // 2)
    expected_imag = np.pi * n if init == "lin" else STATE_DIM / np.pi * (STATE_DIM / (2 * n + 1) - 1)
    np.testing.assert_allclose(mixer.imag_a[...], np.broadcast_to(expected_imag, (WIDTH, STATE_DIM // 2)), rtol=1e-6)
    np.testing.assert_allclose(-np.exp(mixer.log_neg_real_a[...]), -0.5, rtol=1e-6)
    assert np.all((np.exp(mixer.log_dt[...]) >= 0.01) & (np.exp(mixer.log_dt[...]) <= 0.5))

    x = jax.random.normal(jax.random.key(1), (2, 21, WIDTH))
    initial = jax.random.normal(jax.random.key(2), (2, WIDTH, STATE_DIM // 2, 2))

    @nnx.jit
    def run(mixer, x, initial):
        fresh, _ = mixer(x, segment_ids=jnp.asarray(SEGMENT_IDS))
        cached, cache = mixer(x, segment_ids=jnp.asarray(SEGMENT_IDS),
                              cache=S4DCache(state=initial, lengths=jnp.zeros((2,), jnp.int32)))
        return fresh, cached, cache.state

    fresh, cached, final = run(mixer, x, initial)
    real = SEGMENT_IDS != 0
    expected, _ = by_recurrence(mixer, x, np.zeros((2, WIDTH, STATE_DIM // 2)))
    assert rel_err(np.asarray(fresh)[real], expected[real]) < 1e-4
    assert np.all(np.asarray(fresh)[~real] == 0.0)
    expected, expected_final = by_recurrence(mixer, x, np.asarray(initial[..., 0]) + 1j * np.asarray(initial[..., 1]))
    assert rel_err(np.asarray(cached)[real], expected[real]) < 1e-4
    assert rel_err(final[..., 0] + 1j * final[..., 1], expected_final) < 1e-4
    # The cached state reaches row 1's document (it is the row's first) but not row 0's second one.
    assert rel_err(cached[1, 3:], fresh[1, 3:]) > 1e-2 and rel_err(cached[0, 9:17], fresh[0, 9:17]) < 1e-6
