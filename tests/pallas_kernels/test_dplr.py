"""chunk_dplr: every implementation against the token-by-token reference.

Inputs are RWKV-7-like, so that the recurrence is stable: a = -kappa_hat, b = kappa_hat * alpha with
kappa_hat L2-normalised and alpha in (0, 1), making Diag(exp(log_g)) + b a^T a contraction.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.delta import chunk_delta_rule
from seqmix.pallas_kernels.dplr import chunk_dplr, dplr_step

from kernel_checks import (XLA_FORWARDS, assert_gradients_match, assert_matches_reference, outputs_and_gradients,
                           packed_segments, pallas_grids, relative_error, some_keys_steep, xla_forward)

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
GRADIENT_NAMES = ["dq", "dk", "dv", "da", "db", "dlog_g", "dh0"]


def make_inputs(seed, batch=2, length=45, heads=2, key_dim=16, value_dim=32, groups=1, dtype=jnp.float32,
                log_decay=(-1.0, 0.0)):
    """(q, k, v, a, b, log_g, initial_state, segment_ids); q, k with heads / groups heads."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    query_heads = heads // groups
    q = jnp.asarray(normal(batch, length, query_heads, key_dim), dtype)
    k = jnp.asarray(unit(normal(batch, length, query_heads, key_dim)), dtype)
    v = jnp.asarray(normal(batch, length, heads, value_dim), dtype)
    kappa = unit(normal(batch, length, heads, key_dim))
    a = jnp.asarray(-kappa, jnp.float32)
    b = jnp.asarray(kappa * rng.uniform(0.0, 1.0, size=kappa.shape), jnp.float32)
    log_g = jnp.asarray(rng.uniform(*log_decay, size=(batch, length, heads, key_dim)), jnp.float32)
    initial_state = jnp.asarray(normal(batch, heads, key_dim, value_dim), jnp.float32)
    return q, k, v, a, b, log_g, initial_state, packed_segments(rng, batch, length)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(impl, q, k, v, a, b, log_g, initial_state=None, segment_ids=None, chunk_size=16):
    return chunk_dplr(q, k, v, a, b, log_g=log_g, initial_state=initial_state, segment_ids=segment_ids,
                      output_final_state=True, chunk_size=chunk_size, impl=impl)


def projection_weights(inputs, seed=2):
    """Random weights for the output and the final state, of (q, k, v, a, b, log_g, initial_state)'s shapes."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=inputs[2].shape), jnp.float32),
            jnp.asarray(rng.normal(size=inputs[-1].shape), jnp.float32))


def gradients(impl, inputs, segments, chunk_size=16):
    """Outputs and the gradients of q, k, v, a, b, log_g, initial_state of a random projection of
    the output and final state."""
    return outputs_and_gradients(run, impl, tuple(inputs), (segments,), projection_weights(inputs),
                                 options=(("chunk_size", chunk_size),))


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_final_state_match_reference(impl):
    *inputs, segments = make_inputs(0)  # T=45: not a multiple of any chunk; segments start mid-chunk
    expected_out, expected_state = run("reference", *inputs, segments)
    out, state = run(impl, *inputs, segments)
    assert_matches_reference(out, state, expected_out, expected_state, segments)


@pytest.mark.parametrize("groups", [1, 2], ids=["G1", "G2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference(impl, groups):
    """All gradients, with packed segments, an initial state and (G2) two value heads per q/k head."""
    *inputs, segments = make_inputs(1, length=40, heads=2, groups=groups)
    expected_outputs, expected = gradients("reference", inputs, segments)
    outputs, actual = gradients(impl, inputs, segments)
    assert_matches_reference(*outputs, *expected_outputs, segments)
    assert_gradients_match(GRADIENT_NAMES, actual, expected)


def test_pallas_gpu_splits_wide_value_heads_across_programs():
    """V = 128 runs as two programs of 64 value columns per (batch, head) (`sweep_gpu.VALUE_BLOCK`),
    forward and backward, under grouped value heads: outputs, final state and every gradient (the
    key-side ones summed over the two programs) equal the reference's."""
    *inputs, segments = make_inputs(25, length=40, heads=4, value_dim=128, groups=2)
    expected_outputs, expected = gradients("reference", inputs, segments)
    outputs, actual = gradients("pallas_gpu", inputs, segments)
    assert_matches_reference(*outputs, *expected_outputs, segments)
    assert_gradients_match(GRADIENT_NAMES, actual, expected)
    assert pallas_grids(lambda inputs: gradients("pallas_gpu", inputs, segments), inputs) == [(2, 4, 2)] * 2


@pytest.mark.parametrize("forward", XLA_FORWARDS)
@pytest.mark.parametrize("chunk_size", [16, 64])  # the xla path walks chunks of at most 32 tokens
def test_xla_longer_rows_and_chunk_sizes(monkeypatch, chunk_size, forward):
    """Either of the xla path's forwards (a CPU's token scan, the chunked one), each with the chunked
    backward pass after it: values and gradients match the reference."""
    xla_forward(monkeypatch, forward)
    *inputs, segments = make_inputs(3, batch=3, length=203, heads=3, key_dim=32, value_dim=16)
    expected = gradients("reference", inputs, segments)
    traced_afresh = functools.partial(run.__wrapped__)
    actual = outputs_and_gradients(traced_afresh, "xla", tuple(inputs), (segments,), projection_weights(inputs),
                                   options=(("chunk_size", chunk_size),))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert relative_error(a, e) < 1e-4
    for a, e in zip(run("xla", *inputs, segments, chunk_size=chunk_size), expected[0], strict=True):
        assert relative_error(a, e) < 1e-4  # the undifferentiated call


@pytest.mark.parametrize("forward", XLA_FORWARDS)
def test_xla_sweeps_blocks_of_chunks(monkeypatch, forward):
    """Rows swept in blocks of 3 chunks (padded to whole blocks) with segments crossing block
    boundaries, after either forward: values and gradients match the reference."""
    xla_forward(monkeypatch, forward)
    monkeypatch.setattr(chunked, "_CPU_BLOCK_ELEMENTS", 3 * 2 * 2 * 16 * (16 + 32))  # B * H * C * (K + V)
    *inputs, segments = make_inputs(12, length=150)
    # traced afresh (the block size is read when the op is traced, which a compilation keyed on
    # shapes would not see)
    actual = outputs_and_gradients.__wrapped__(run.__wrapped__, "xla", tuple(inputs), (segments,),
                                               projection_weights(inputs), options=(("chunk_size", 16),))
    expected = gradients("reference", inputs, segments)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert relative_error(a, e) < 1e-4


def test_splitting_a_sequence_and_carrying_the_state_equals_the_whole():
    q, k, v, a, b, log_g, h0, _ = make_inputs(4, length=100, groups=2)
    whole, whole_state = run("xla", q, k, v, a, b, log_g, h0)
    cut = 37
    first, state = run("xla", *(x[:, :cut] for x in (q, k, v, a, b, log_g)), h0)
    second, final = run("xla", *(x[:, cut:] for x in (q, k, v, a, b, log_g)), state)
    assert relative_error(jnp.concatenate([first, second], axis=1), whole) < 1e-5
    assert relative_error(final, whole_state) < 1e-5


def test_decode_steps_equal_the_chunked_output():
    q, k, v, a, b, log_g, h0, _ = make_inputs(5, length=30, groups=2)
    chunked_out, chunked_state = run("xla", q, k, v, a, b, log_g, h0)
    state, outs = h0, []
    for t in range(q.shape[1]):
        out, state = dplr_step(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state, log_g=log_g[:, t])
        outs.append(out)
    assert relative_error(jnp.stack(outs, axis=1), chunked_out) < 1e-5
    assert relative_error(state, chunked_state) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_a_padding_tail_leaves_the_final_state_unchanged(impl):
    """A row ending in padding has the final state of the row cut before the padding (transformers
    #46190: padded tokens in the last chunk must not update the state)."""
    q, k, v, a, b, log_g, h0, _ = make_inputs(6, batch=1, length=40)
    segments = jnp.asarray([[1] * 27 + [0] * 13], jnp.int32)
    out, state = run(impl, q, k, v, a, b, log_g, h0, segments)
    cut_out, cut_state = run("reference", *(x[:, :27] for x in (q, k, v, a, b, log_g)), h0)
    assert relative_error(state, cut_state) < 1e-5
    assert relative_error(out[:, :27], cut_out) < 1e-5
    assert np.all(np.asarray(out[:, 27:]) == 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_decays_of_minus_8_per_token_stay_finite_and_exact(impl):
    """-8 nats per token inside 64-token chunks: cumulative decays reach -512 (exp overflows past
    88), so only exp(G_i - G_j), i >= j, or factors around a point inside the chunk may appear."""
    *inputs, segments = make_inputs(7, batch=1, length=128, heads=1, log_decay=(-8.0, -8.0))
    (expected_out, expected_state), expected = gradients("reference", inputs, segments, chunk_size=64)
    (out, state), actual = gradients(impl, inputs, segments, chunk_size=64)
    for a in jax.tree.leaves((out, state, actual)):
        assert np.all(np.isfinite(np.asarray(a)))
    assert_matches_reference(out, state, expected_out, expected_state, segments)
    assert_gradients_match(GRADIENT_NAMES, actual, expected)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_a_few_steep_keys_among_mild_ones_stay_exact(impl):
    """Some keys decaying by 4 nats a token beside mild ones, how many differing by head and by half
    chunk (3 to 16 of 32 keys): values and gradients match the reference."""
    q, k, v, a, b, _, h0, segments = make_inputs(10, batch=1, length=192, heads=3, key_dim=32)
    inputs = (q, k, v, a, b, some_keys_steep(11, a.shape), h0)
    (expected_out, expected_state), expected = gradients("reference", inputs, segments, chunk_size=64)
    (out, state), actual = gradients(impl, inputs, segments, chunk_size=64)
    assert_matches_reference(out, state, expected_out, expected_state, segments)
    assert_gradients_match(GRADIENT_NAMES, actual, expected)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_a_gate_of_exactly_zero_is_the_ungated_delta_rule(impl):
    """log_g = 0 (fla #389), a = -beta k, b = k and values beta v: DeltaNet's update
    S + beta k (v - S^T k)^T, which chunk_delta_rule computes by another derivation."""
    q, k, v, _, _, log_g, h0, segments = make_inputs(8)
    beta = jnp.asarray(np.random.default_rng(9).uniform(size=v.shape[:3]), jnp.float32)
    out, state = run(impl, q, k, beta[..., None] * v, -beta[..., None] * k, jnp.broadcast_to(k, log_g.shape),
                     jnp.zeros_like(log_g), h0, segments)
    expected_out, expected_state = chunk_delta_rule(q, k, v, beta, initial_state=h0, segment_ids=segments,
                                                    output_final_state=True, chunk_size=16, impl="reference")
    assert_matches_reference(out, state, expected_out, expected_state, segments)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    """bf16 q, k, v with float32 a, b, gates and state: within 1e-2 of the float32 reference."""
    q, k, v, a, b, log_g, h0, segments = make_inputs(10)
    out, state = run(impl, *(x.astype(jnp.bfloat16) for x in (q, k, v)), a, b, log_g, h0, segments)
    expected_out, expected_state = run("reference", q, k, v, a, b, log_g, h0, segments)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert relative_error(out, expected_out) < 1e-2
    assert relative_error(state, expected_state) < 1e-2


def test_auto_is_the_xla_path_on_cpu():
    *inputs, segments = make_inputs(11)
    for a, b in zip(run("auto", *inputs, segments), run("xla", *inputs, segments)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    (dict(k=jnp.zeros((2, 45, 2, 8))), "k must be"),
    (dict(v=jnp.zeros((2, 44, 2, 32))), "v must be"),
    (dict(a=jnp.zeros((2, 45, 2))), "a must be"),
    (dict(b=jnp.zeros((2, 45, 2, 32))), "b must be"),
    (dict(log_g=jnp.zeros((2, 45, 1, 16))), "log_g must be"),
    (dict(initial_state=jnp.zeros((2, 2, 32, 16))), "initial_state must be"),
    (dict(segment_ids=jnp.zeros((2, 45), jnp.float32)), "segment_ids must be integers"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(impl="pallas"), "impl='pallas'"),
])
def test_bad_input_is_named(change, message):
    q, k, v, a, b, log_g, _, _ = make_inputs(12)
    args = dict(q=q, k=k, v=v, a=a, b=b, log_g=log_g) | change
    with pytest.raises(ValueError, match=f"chunk_dplr: .*{message}"):
        chunk_dplr(**args)


@pytest.mark.parametrize("key_dim, value_dim, message", [(24, 32, "K=24"), (16, 8, "V=8")])
def test_gpu_kernel_rejects_shapes_triton_cannot_tile(key_dim, value_dim, message):
    q, k, v, a, b, log_g, _, _ = make_inputs(13, key_dim=key_dim, value_dim=value_dim)
    with pytest.raises(ValueError, match=message):
        chunk_dplr(q, k, v, a, b, log_g=log_g, impl="pallas_gpu")
