"""The STU layer beyond the mixer harness: its filters are the top eigenvectors of the Hankel
matrix, and its output (training, and a prefill from a cached window) equals the paper's sums
written out in float64 numpy, on packed rows with padding before, inside and after segments, with
filters shorter than the row."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import ConfigError, build
from seqmix.mixers.spectral_ssm import SpectralSSM, SpectralSSMCache, SpectralSSMConfig
from seqmix.models.config import ModelConfig

WIDTH, FILTERS, TAPS = 6, 3, 8
SEGMENT_IDS = np.array([[1] * 9 + [2] * 8 + [0] * 4, [0] * 3 + [3] * 6 + [0] * 2 + [3] * 10])


def hankel_eigenpairs():
    """(sigma [K], phi [L, K]) from numpy.linalg.eigh of Z_L[i, j] = 2 / ((i+j)^3 - (i+j)), 1-based."""
    z = np.array([[2.0 / ((i + j) ** 3 - (i + j)) for j in range(1, TAPS + 1)] for i in range(1, TAPS + 1)])
    sigma, phi = np.linalg.eigh(z)
    order = np.argsort(sigma)[::-1][:FILTERS]
    return sigma[order], phi[:, order]


def by_sums(mixer, x, window):
    """float64 y [B, T, D]: v = x W_in over each row's real tokens (padding skipped), preceded by
    `window` [B, L-1, D] for the row's first segment; U+-_{t,k} = sum_{j<L} sigma_k^(1/4)
    (+-1)^j phi_k[j] v_{t-j} over t's segment; y_t = sum_k M+[k] U+_{t,k} + M-[k] U-_{t,k}."""
    sigma, phi = hankel_eigenpairs()
    phi = phi * np.sign([column[np.argmax(np.abs(column))] for column in phi.T])  # the module's sign convention
    f64 = lambda a: np.asarray(a, np.float64)
    v_all = f64(x) @ f64(mixer.in_proj.kernel[...])
    m_plus, m_minus = f64(mixer.m_plus[...]), f64(mixer.m_minus[...])
    y = np.zeros(v_all.shape)
    for b in range(x.shape[0]):
        real = [t for t in range(x.shape[1]) if SEGMENT_IDS[b, t] != 0]
        first = SEGMENT_IDS[b, real[0]]
        for position, t in enumerate(real):
            ids = SEGMENT_IDS[b, real[: position + 1]]
            past = [v_all[b, s] for s, id_s in zip(real[: position + 1], ids) if id_s == SEGMENT_IDS[b, t]]
            if SEGMENT_IDS[b, t] == first:
                past = list(f64(window[b])) + past
            for k in range(FILTERS):
                for j in range(min(TAPS, len(past))):
                    u = sigma[k] ** 0.25 * phi[j, k] * past[-1 - j]
                    y[b, t] += m_plus[k] * u + m_minus[k] * (-1) ** j * u
    return y


def test_stu_equals_the_papers_sums_on_packed_rows_with_and_without_a_cached_window():
    model = build(ModelConfig, {"d_model": WIDTH, "n_heads": 1, "init_std": 0.5}, "model")
    mixer = SpectralSSM(model, build(SpectralSSMConfig, {"num_filters": FILTERS, "filter_length": TAPS}, "mixer"),
                        rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 21, WIDTH))
    window = jax.random.normal(jax.random.key(2), (2, TAPS - 1, WIDTH))

    @nnx.jit
    def run(mixer, x, window, segment_ids):
        fresh, _ = mixer(x, segment_ids=segment_ids)
        cached, cache = mixer(x, segment_ids=segment_ids,
                              cache=SpectralSSMCache(window=window, lengths=jnp.zeros((2,), jnp.int32)))
        return fresh, cached, cache.window

    fresh, cached, new_window = run(mixer, x, window, jnp.asarray(SEGMENT_IDS))
    real = SEGMENT_IDS != 0
    expected = by_sums(mixer, x, np.zeros(window.shape))
    assert rel_err(np.asarray(fresh)[real], expected[real]) < 1e-4
    assert np.all(np.asarray(fresh)[~real] == 0.0)
    assert rel_err(np.asarray(cached)[real], by_sums(mixer, x, window)[real]) < 1e-4
    # The window after the call: the last L-1 inputs of each row's last segment, zeros before it.
    v = np.asarray(x @ mixer.in_proj.kernel[...])
    np.testing.assert_allclose(new_window[0], v[0, 10:17], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_window[1], v[1, 14:21], rtol=1e-5, atol=1e-6)
    # A last document of 2 tokens leaves zeros before them, not the previous document's inputs.
    *_, new_window = run(mixer, x, window, jnp.asarray([[1] * 19 + [2] * 2, [3] * 21]))
    np.testing.assert_allclose(new_window[0], np.concatenate([np.zeros((5, WIDTH)), v[0, 19:]]), rtol=1e-5, atol=1e-6)


def test_filters_are_the_top_hankel_eigenvectors_and_bad_sizes_are_refused():
    sigma, phi = hankel_eigenpairs()
    model = build(ModelConfig, {"d_model": WIDTH, "n_heads": 1}, "model")
    mixer = SpectralSSM(model, build(SpectralSSMConfig, {"num_filters": FILTERS, "filter_length": TAPS}, "mixer"),
                        rngs=nnx.Rngs(0))
    nnx.update(mixer, nnx.State({"m_plus": jnp.eye(FILTERS, WIDTH), "m_minus": jnp.zeros((FILTERS, WIDTH))}))
    # Channel k < K holds sigma_k^(1/4) phi_k, up to the eigenvector's sign.
    got = np.asarray(mixer.filters())[:FILTERS].T
    np.testing.assert_allclose(np.abs(got), np.abs(phi * sigma**0.25), rtol=1e-5, atol=1e-7)
    try:
        build(SpectralSSMConfig, {"num_filters": 9, "filter_length": 8}, "mixer")
    except ConfigError as error:
        assert "mixer.num_filters" in str(error)
    else:
        raise AssertionError("num_filters > filter_length was accepted")
