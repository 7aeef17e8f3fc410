"""The selective scan (Mamba-1's and Longhorn's updates): the reference and the decode step
against a float64 numpy loop of the equations, the xla and pallas_gpu paths against the reference
(outputs, final states and the gradients of every input) on odd lengths, packed rows and initial
states, and the GPU kernel's Triton lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import assert_gradients_match, assert_matches_reference, packed_segments, relative_error

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.selective_scan import selective_scan, selective_scan_step


def inputs(update, batch, length, channels, state_dim, seed=0):
    """(x, dt, A, B, C, initial_state) float32: dt > 0 (Longhorn's in (0, 1)), A < 0 or None."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (batch, length, channels))
    logits = jax.random.normal(keys[1], (batch, length, channels))
    dt = jax.nn.softplus(logits) if update == "mamba" else jax.nn.sigmoid(logits)
    A = -jnp.exp(jax.random.normal(keys[2], (channels, state_dim))) if update == "mamba" else None
    B, C = (jax.random.normal(key, (batch, length, state_dim)) for key in keys[3:5])
    return x, dt, A, B, C, jax.random.normal(keys[5], (batch, channels, state_dim))


def numpy_scan(update, x, dt, A, B, C, initial_state, segment_ids):
    """y [B, T, D], final state [B, D, N], float64, token by token from the paper's equations;
    the state resets at each segment start after the row's first, padding is skipped."""
    x, dt, B, C = (np.asarray(a, np.float64) for a in (x, dt, B, C))
    ids = np.asarray(segment_ids)
    y, finals = np.zeros_like(x), []
    for row in range(x.shape[0]):
        h, previous_id = np.array(initial_state[row], np.float64), None
        for t in range(x.shape[1]):
            if ids[row, t] == 0:
                continue
            if previous_id is not None and ids[row, t] != previous_id:
                h = np.zeros_like(h)
            previous_id = ids[row, t]
            if update == "mamba":  # zero-order hold of A, Euler step for B (Mamba's S6)
                h = np.exp(dt[row, t][:, None] * np.asarray(A, np.float64)) * h \
                    + np.outer(dt[row, t] * x[row, t], B[row, t])
            else:  # Longhorn: eps = beta / (1 + beta |k|^2), S = (1 - eps k^2) S + eps x k
                eps = dt[row, t] / (1 + dt[row, t] * np.sum(B[row, t] ** 2))
                h = (1 - np.outer(eps, B[row, t] ** 2)) * h + np.outer(eps * x[row, t], B[row, t])
            y[row, t] = h @ C[row, t]
        finals.append(h)
    return y, np.stack(finals)


@pytest.mark.parametrize("update", ["mamba", "longhorn"])
def test_reference_and_step_match_the_equations(update):
    x, dt, A, B, C, h0 = inputs(update, 2, 23, 5, 3)
    segment_ids = jnp.array([[1] * 7 + [0] * 2 + [2] * 10 + [0] * 4, [0] * 3 + [4] * 20])
    expected_y, expected_state = numpy_scan(update, x, dt, A, B, C, h0, segment_ids)
    y, state = selective_scan(x, dt, A, B, C, update=update, initial_state=h0, segment_ids=segment_ids,
                              output_final_state=True, impl="reference")
    assert relative_error(y, expected_y) < 1e-5 and relative_error(state, expected_state) < 1e-5
    # Decoding a single document token by token from its initial state is the op.
    step = jax.jit(lambda x, dt, B, C, state: selective_scan_step(x, dt, A, B, C, state, update=update))
    state, outputs = h0, []
    for t in range(x.shape[1]):
        out, state = step(x[:, t], dt[:, t], B[:, t], C[:, t], state)
        outputs.append(out)
    expected_y, expected_state = numpy_scan(update, x, dt, A, B, C, h0, jnp.ones((2, 23), jnp.int32))
    assert relative_error(jnp.stack(outputs, 1), expected_y) < 1e-5 and relative_error(state, expected_state) < 1e-5


@pytest.mark.parametrize("update", ["mamba", "longhorn"])
def test_xla_and_pallas_gpu_match_the_reference_with_gradients(update):
    """pallas_gpu runs interpreted here; its backward is xla's, from the chunk starts it stores."""
    x, dt, A, B, C, h0 = inputs(update, 2, 67, 16, 16, seed=1)  # odd T: a partial last chunk
    segment_ids = packed_segments(np.random.default_rng(0), 2, 67)
    weights = jax.random.normal(jax.random.key(9), x.shape), jax.random.normal(jax.random.key(8), h0.shape)

    def loss(impl, x, dt, A, B, C, h0):
        y, state = selective_scan(x, dt, A, B, C, update=update, initial_state=h0, segment_ids=segment_ids,
                                  output_final_state=True, chunk_size=16, impl=impl)
        return jnp.sum(y * weights[0]) + jnp.sum(state * weights[1]), (y, state)

    @jax.jit
    def every_implementation(x, dt, A, B, C, h0):
        return [jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(x, dt, A, B, C, h0)
                for impl in ("xla", "pallas_gpu", "reference")]

    *implementations, (expected_grads, (expected_y, expected_state)) = every_implementation(x, dt, A, B, C, h0)
    names = ["dx", "ddt", *(["dA"] if A is not None else []), "dB", "dC", "dinitial_state"]
    for grads, (y, state) in implementations:
        assert_matches_reference(y, state, expected_y, expected_state, segment_ids)
        assert_gradients_match(names, grads, expected_grads)


@pytest.mark.parametrize("update", ["mamba", "longhorn"])
def test_pallas_gpu_lowers_to_triton(update):
    """The kernel lowers for a GPU (an abstract H100), bfloat16 inputs, T not a power of two."""
    x, dt, A, B, C, h0 = (a if a is None or a.ndim < 3 else a.astype(jnp.bfloat16)
                          for a in inputs(update, 1, 75, 32, 16))
    segment_ids = packed_segments(np.random.default_rng(1), 1, 75)

    def loss(x, dt, B, C, h0):
        y, state = selective_scan(x, dt, A, B, C, update=update, initial_state=h0, segment_ids=segment_ids,
                                  output_final_state=True, chunk_size=32, impl="pallas_gpu")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

    lowered = registry.lower_for_device(jax.value_and_grad(loss, argnums=range(5)), (x, dt, B, C, h0), "gpu")
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1  # the forward kernel (the backward is XLA's)


def test_bad_arguments_are_refused():
    x, dt, A, B, C = (np.ones(shape, np.float32) for shape in [(1, 4, 2), (1, 4, 2), (2, 3), (1, 4, 3), (1, 4, 3)])
    with pytest.raises(ValueError, match="A .* must be None for 'longhorn'"):
        selective_scan(x, dt, A, B, C, update="longhorn")
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x, dt, A.T, B, C)
    with pytest.raises(ValueError, match="update must be one of"):
        selective_scan(x, dt, A, B, C, update="s4")
