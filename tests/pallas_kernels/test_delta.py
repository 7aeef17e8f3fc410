"""chunk_delta_rule: every implementation against the token-by-token reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.delta import chunk_delta_rule, delta_step
from seqmix.pallas_kernels.triangular import unit_lower_inverse

from kernel_checks import (XLA_FORWARDS, assert_gradients_match, assert_matches_reference, outputs_and_gradients,
                           packed_segments, pallas_grids, relative_error, some_keys_steep, xla_forward)

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
GATES = ["gated", "plain", "key"]  # log_a per head (Gated DeltaNet), none (DeltaNet), log_g per key (KDA)


def make_inputs(seed, batch=2, length=45, heads=2, key_dim=16, value_dim=32, gate="gated", dtype=jnp.float32,
                beta_range=(0.0, 1.0), log_decay=(-1.0, 0.0), query_heads=None):
    """query_heads: q/k heads when fewer than `heads` (grouped value heads)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape)
    query_heads = query_heads or heads
    q = jnp.asarray(normal(batch, length, query_heads, key_dim), dtype)
    k = normal(batch, length, query_heads, key_dim)
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype)
    v = jnp.asarray(normal(batch, length, heads, value_dim), dtype)
    beta = jnp.asarray(rng.uniform(*beta_range, size=(batch, length, heads)), jnp.float32)
    log_a = jnp.asarray(rng.uniform(*log_decay, size=(batch, length, heads)), jnp.float32)
    initial_state = jnp.asarray(normal(batch, heads, key_dim, value_dim), jnp.float32)
    segment_ids = packed_segments(rng, batch, length)
    # Drawn last, so that the per-head and plain cases keep the inputs they had before per-key gates.
    log_g = jnp.asarray(rng.uniform(*log_decay, size=(batch, length, heads, key_dim)), jnp.float32)
    gates = {"gated": dict(log_a=log_a), "plain": {}, "key": dict(log_g=log_g)}[gate]
    return q, k, v, beta, gates, initial_state, segment_ids


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(impl, q, k, v, beta, gates, initial_state=None, segment_ids=None, chunk_size=16):
    return chunk_delta_rule(q, k, v, beta, **gates, initial_state=initial_state, segment_ids=segment_ids,
                            output_final_state=True, chunk_size=chunk_size, impl=impl)


def gradients(impl, inputs, segment_ids, weights, chunk_size=16):
    """((out, state), d/d inputs) of sum(out * weights[0]) + sum(state * weights[1]); inputs:
    (q, k, v, beta, gates, initial_state)."""
    return outputs_and_gradients(run, impl, inputs, (segment_ids,), weights, options=(("chunk_size", chunk_size),))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_final_state_match_reference(impl, gate):
    q, k, v, beta, gates, h0, segments = make_inputs(0, gate=gate)  # T=45: not a multiple of any chunk
    expected_out, expected_state = run("reference", q, k, v, beta, gates, h0, segments)
    out, state = run(impl, q, k, v, beta, gates, h0, segments)
    assert_matches_reference(out, state, expected_out, expected_state, segments)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference(impl, gate):
    q, k, v, beta, gates, h0, segments = make_inputs(1, length=40, gate=gate)
    rng = np.random.default_rng(2)
    out_weights = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
    state_weights = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

    inputs, weights = (q, k, v, beta, gates, h0), (out_weights, state_weights)
    expected_outputs, expected = gradients("reference", inputs, segments, weights)
    outputs, actual = gradients(impl, inputs, segments, weights)
    assert_matches_reference(*outputs, *expected_outputs, segments)  # the differentiated call's forward
    names = ["dq", "dk", "dv", "dbeta", *(f"d{name}" for name in gates), "dh0"]
    assert_gradients_match(names, actual, expected)


@pytest.mark.parametrize("gate", ["gated", "key"])
@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_value_heads_match_reference(impl, gate):
    """Four value heads reading two q/k heads (value head j reads head j // 2): outputs, final state
    and every gradient, finite (fla #624: KDA gave NaN when the head counts differ) and equal to
    the reference; and the reference equals the op on q, k repeated to the value heads."""
    q, k, v, beta, gates, h0, segments = make_inputs(15, length=40, heads=4, query_heads=2, gate=gate)
    inputs = (q, k, v, beta, gates, h0)
    weights = (jnp.asarray(np.random.default_rng(16).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    expected, expected_grads = gradients("reference", inputs, segments, weights)
    actual, actual_grads = gradients(impl, inputs, segments, weights)
    for a, e in zip(jax.tree.leaves((actual, actual_grads)), jax.tree.leaves((expected, expected_grads))):
        assert np.all(np.isfinite(np.asarray(a)))
        assert relative_error(a, e) < 1e-4
    repeated = run("reference", *(jnp.repeat(x, 2, axis=2) for x in (q, k)), v, beta, gates, h0, segments)
    for a, e in zip(expected, repeated):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_pallas_gpu_splits_wide_value_heads_across_programs():
    """V = 128 runs as two programs of 64 value columns per (batch, head) (`sweep_gpu.VALUE_BLOCK`),
    forward and backward, under grouped value heads and KDA's per-key gates: outputs, final state and
    every gradient (the key-side ones summed over the two programs) equal the reference's."""
    q, k, v, beta, gates, h0, segments = make_inputs(23, length=40, heads=4, query_heads=2, value_dim=128, gate="key")
    inputs = (q, k, v, beta, gates, h0)
    weights = (jnp.asarray(np.random.default_rng(24).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    expected, expected_grads = gradients("reference", inputs, segments, weights)
    actual, actual_grads = gradients("pallas_gpu", inputs, segments, weights)
    assert_matches_reference(*actual, *expected, segments)
    assert_gradients_match(["dq", "dk", "dv", "dbeta", "dlog_g", "dh0"], actual_grads, expected_grads)
    assert pallas_grids(lambda inputs: gradients("pallas_gpu", inputs, segments, weights), inputs) == [(2, 4, 2)] * 2


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_per_key_gates_over_several_sub_blocks_per_chunk(impl):
    """64-token chunks (four 16-token sub-blocks, the earlier ones factored around a reference
    token) with mild per-key decays and grouped heads: values and gradients match the reference."""
    q, k, v, beta, gates, h0, segments = make_inputs(19, length=100, heads=4, query_heads=2, gate="key",
                                                     log_decay=(-0.5, 0.0))
    inputs = (q, k, v, beta, gates, h0)
    weights = (jnp.asarray(np.random.default_rng(20).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    expected, expected_grads = gradients("reference", inputs, segments, weights, chunk_size=64)
    actual, actual_grads = gradients(impl, inputs, segments, weights, chunk_size=64)
    for a, e in zip(jax.tree.leaves((actual, actual_grads)), jax.tree.leaves((expected, expected_grads))):
        assert relative_error(a, e) < 1e-4


@pytest.mark.parametrize("forward", XLA_FORWARDS)
@pytest.mark.parametrize("chunk_size", [16, 48, 64, 128])  # 48: the inverse pads to 64
def test_xla_longer_rows_and_chunk_sizes(monkeypatch, chunk_size, forward):
    """Either of the xla path's forwards (a CPU's token scan, the chunked one), each with the chunked
    backward pass after it: values and gradients match the reference."""
    xla_forward(monkeypatch, forward)
    q, k, v, beta, gates, h0, segments = make_inputs(3, batch=3, length=203, heads=3, key_dim=32, value_dim=16)
    inputs = (q, k, v, beta, gates, h0)
    weights = (jnp.asarray(np.random.default_rng(4).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    expected, expected_grads = gradients("reference", inputs, segments, weights)
    traced_afresh = functools.partial(run.__wrapped__)
    actual, actual_grads = outputs_and_gradients(traced_afresh, "xla", inputs, (segments,), weights,
                                                 options=(("chunk_size", chunk_size),))
    for a, e in zip(jax.tree.leaves((actual, actual_grads)), jax.tree.leaves((expected, expected_grads))):
        assert relative_error(a, e) < 1e-4
    for a, e in zip(run("xla", *inputs, segments, chunk_size=chunk_size), expected, strict=True):
        assert relative_error(a, e) < 1e-4  # the undifferentiated call


@pytest.mark.parametrize("forward", XLA_FORWARDS)
@pytest.mark.parametrize("gate", GATES)
def test_xla_sweeps_blocks_of_chunks(monkeypatch, gate, forward):
    """Rows swept in blocks of 3 chunks (padded to whole blocks) with segments crossing block
    boundaries, after either forward: values and gradients match the reference."""
    xla_forward(monkeypatch, forward)
    monkeypatch.setattr(chunked, "_CPU_BLOCK_ELEMENTS", 3 * 2 * 2 * 16 * (16 + 32))  # B * H * C * (K + V)
    q, k, v, beta, gates, h0, segments = make_inputs(12, length=150, gate=gate)
    weights = jnp.asarray(np.random.default_rng(13).normal(size=v.shape), jnp.float32)

    inputs, weights = (q, k, v, beta, gates, h0), (weights, jnp.ones_like(h0))
    # traced afresh (the block size is read when the op is traced, which a compilation keyed on
    # shapes would not see)
    actual, actual_grads = outputs_and_gradients.__wrapped__(run.__wrapped__, "xla", inputs, (segments,), weights,
                                                             options=(("chunk_size", 16),))
    expected, expected_grads = gradients("reference", inputs, segments, weights)
    for a, e in zip(jax.tree.leaves((actual, actual_grads)), jax.tree.leaves((expected, expected_grads))):
        assert relative_error(a, e) < 1e-4


@pytest.mark.parametrize("size", [16, 48, 64])
def test_block_doubling_inverts_unit_lower_triangular_systems(size):
    """(I + L)^-1 for a chunk's L_ij = beta_i (k_i.k_j), j < i, with beta near 2 (entries up to 2),
    including a chunk length that is no power of two, in both layouts: one [C, C] tile (the Pallas
    kernels') and a batch [2, C, C] (the XLA paths'). Neither reads L's diagonal or upper triangle."""
    rng = np.random.default_rng(14)
    keys = rng.normal(size=(size, 16))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    lower = np.tril(rng.uniform(1.9, 2.0, size=(size, 1)) * (keys @ keys.T), -1)
    expected = np.linalg.inv(np.eye(size) + lower)
    with_junk = jnp.asarray(lower + np.triu(rng.normal(size=(size, size))), jnp.float32)  # ignored entries
    tile = unit_lower_inverse(with_junk)
    batch = unit_lower_inverse(jnp.stack([with_junk, jnp.zeros_like(with_junk)]))
    assert relative_error(tile, expected) < 1e-5
    assert relative_error(batch[0], expected) < 1e-5
    assert relative_error(batch[1], np.eye(size)) == 0


@pytest.mark.parametrize("gate", GATES)
def test_splitting_a_sequence_and_carrying_the_state_equals_the_whole(gate):
    q, k, v, beta, gates, h0, _ = make_inputs(4, length=100, gate=gate)
    whole, whole_state = run("xla", q, k, v, beta, gates, h0)
    cut = 37
    head = {name: g[:, :cut] for name, g in gates.items()}
    tail = {name: g[:, cut:] for name, g in gates.items()}
    first, state = run("xla", q[:, :cut], k[:, :cut], v[:, :cut], beta[:, :cut], head, h0)
    second, final = run("xla", q[:, cut:], k[:, cut:], v[:, cut:], beta[:, cut:], tail, state)
    assert relative_error(jnp.concatenate([first, second], axis=1), whole) < 1e-5
    assert relative_error(final, whole_state) < 1e-5


@pytest.mark.parametrize("gate", GATES)
def test_decode_steps_equal_the_chunked_output(gate):
    q, k, v, beta, gates, h0, _ = make_inputs(5, length=30, gate=gate)
    chunked_out, chunked_state = run("xla", q, k, v, beta, gates, h0)
    state, outs = h0, []
    for t in range(q.shape[1]):
        step_gates = {name: g[:, t] for name, g in gates.items()}
        out, state = delta_step(q[:, t], k[:, t], v[:, t], beta[:, t], state, **step_gates)
        outs.append(out)
    assert relative_error(jnp.stack(outs, axis=1), chunked_out) < 1e-5
    assert relative_error(state, chunked_state) < 1e-5


EXTREMES = {"beta_near_2": ((1.9, 2.0), (-0.01, 0.0)), "minus8_per_step": ((0.0, 1.0), (-8.0, -8.0)),
            "minus20_per_step": ((0.0, 1.0), (-20.0, -20.0)), "mixed": ((0.0, 2.0), (-60.0, 0.0))}
# Per-key gates where their numerics differ from the per-head ones: strong decay inside 16-token
# sub-blocks (the xla and TPU paths factor around a reference token; the GPU kernel's 16-token
# chunks take every decay elementwise, as the per-head cases already check).
EXTREME_CASES = ([(case, impl, "gated") for case in EXTREMES for impl in IMPLS]
                 + [(case, impl, "key") for case in ("minus8_per_step", "mixed") for impl in ("xla", "pallas_tpu")])


@pytest.mark.parametrize("case, impl, gate", EXTREME_CASES)
def test_extreme_betas_and_decays_stay_finite_and_exact(case, impl, gate):
    """beta near 2 makes each factor I - beta k k^T a reflection (eigenvalue -1): the state neither
    decays nor grows, and the chunk's triangular system has entries near 2. -8 nats per step puts
    exponents of +-512 inside a 64-token chunk (no exp(-G) from the chunk start may be formed);
    -20 underflows every cross-token decay; "mixed" draws each step's (or key's) decay in [-60, 0]."""
    beta_range, log_decay = EXTREMES[case]
    q, k, v, beta, gates, h0, segments = make_inputs(6, batch=1, length=256, beta_range=beta_range,
                                                     log_decay=log_decay, gate=gate)

    inputs = (q, k, v, beta, gates, h0)
    weights = (jnp.asarray(np.random.default_rng(21).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    expected, expected_grads = gradients("reference", inputs, segments, weights, chunk_size=64)
    actual, grads = gradients(impl, inputs, segments, weights, chunk_size=64)
    for a, e in zip(jax.tree.leaves((actual, grads)), jax.tree.leaves((expected, expected_grads))):
        assert np.all(np.isfinite(np.asarray(a)))
        assert relative_error(a, e) < 1e-4


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_a_few_steep_keys_among_mild_ones_stay_exact(impl):
    """Per-key gates where some keys decay by 4 nats a token and the rest mildly, how many differing
    by head and by half chunk (3 to 16 of 32 keys): values and gradients match the reference."""
    q, k, v, beta, _, h0, segments = make_inputs(19, batch=1, length=192, heads=3, key_dim=32)
    inputs = (q, k, v, beta, dict(log_g=some_keys_steep(20, v.shape[:3] + (32,))), h0)
    weights = (jnp.asarray(np.random.default_rng(21).normal(size=v.shape), jnp.float32), jnp.ones_like(h0))
    (expected_out, expected_state), expected = gradients("reference", inputs, segments, weights, chunk_size=64)
    (out, state), actual = gradients(impl, inputs, segments, weights, chunk_size=64)
    assert_matches_reference(out, state, expected_out, expected_state, segments)
    assert_gradients_match(["dq", "dk", "dv", "dbeta", "dlog_g", "dh0"], actual, expected)


@pytest.mark.parametrize("gate", ["gated", "key"])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_gate_of_exactly_zero_equals_the_ungated_op(impl, gate):
    """log decay 0 (fla #389: a gate of exactly 0 in log space) is the plain delta rule."""
    q, k, v, beta, gates, h0, segments = make_inputs(17, gate=gate)
    zero_gates = {name: jnp.zeros_like(g) for name, g in gates.items()}
    gated = run(impl, q, k, v, beta, zero_gates, h0, segments)
    plain = run("reference", q, k, v, beta, {}, h0, segments)
    for a, e in zip(gated, plain):
        assert relative_error(a, e) < 1e-5


@pytest.mark.parametrize("gate", ["gated", "key"])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_padding_tail_leaves_the_final_state_unchanged(impl, gate):
    """Padding after a row's last token (transformers #46190: padded tokens in the last chunk
    updated the state) reads nothing, writes nothing: the final state is the one of the real tokens."""
    q, k, v, beta, gates, h0, _ = make_inputs(18, length=40, gate=gate)
    real = 29
    segments = jnp.asarray(np.arange(40)[None, :] < real, jnp.int32).repeat(2, axis=0)
    out, state = run(impl, q, k, v, beta, gates, h0, segments)
    cut = {name: g[:, :real] for name, g in gates.items()}
    expected_out, expected_state = run("reference", q[:, :real], k[:, :real], v[:, :real], beta[:, :real], cut, h0)
    assert relative_error(state, expected_state) < 1e-5
    assert relative_error(out[:, :real], expected_out) < 1e-5
    assert np.all(np.asarray(out[:, real:]) == 0.0)


@pytest.mark.parametrize("gate", ["gated", "key"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl, gate):
    """bf16 q, k, v with float32 beta, gates and accumulation: within 1e-2 of the float32 reference."""
    q, k, v, beta, gates, h0, segments = make_inputs(7, gate=gate)
    out, state = run(impl, *(x.astype(jnp.bfloat16) for x in (q, k, v)), beta, gates, h0, segments)
    expected_out, expected_state = run("reference", q, k, v, beta, gates, h0, segments)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert relative_error(out, expected_out) < 1e-2
    assert relative_error(state, expected_state) < 1e-2


def test_auto_is_the_xla_path_on_cpu():
    q, k, v, beta, gates, h0, segments = make_inputs(8)
    for a, b in zip(run("auto", q, k, v, beta, gates, h0, segments), run("xla", q, k, v, beta, gates, h0, segments)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    (dict(k=jnp.zeros((2, 45, 2, 8))), "k must be"),
    (dict(v=jnp.zeros((2, 44, 2, 32))), "v must be"),
    (dict(beta=jnp.zeros((2, 45))), "beta must be"),
    (dict(log_a=jnp.zeros((2, 45, 2, 16))), "log_a must be"),
    (dict(log_g=jnp.zeros((2, 45, 2))), "log_g must be"),
    (dict(log_a=jnp.zeros((2, 45, 2)), log_g=jnp.zeros((2, 45, 2, 16))), "not both"),
    (dict(v=jnp.zeros((2, 45, 3, 32))), "multiple of q's 2 heads"),
    (dict(initial_state=jnp.zeros((2, 2, 32, 16))), "initial_state must be"),
    (dict(segment_ids=jnp.zeros((2, 45), jnp.float32)), "segment_ids must be integers"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(impl="pallas"), "impl='pallas'"),
])
def test_bad_input_is_named(change, message):
    q, k, v, beta, _, _, _ = make_inputs(10)
    args = dict(q=q, k=k, v=v, beta=beta) | change
    with pytest.raises(ValueError, match=message):
        chunk_delta_rule(**args)


@pytest.mark.parametrize("key_dim, value_dim, message", [(24, 32, "K=24"), (16, 8, "V=8")])
def test_gpu_kernel_rejects_shapes_triton_cannot_tile(key_dim, value_dim, message):
    q, k, v, beta, gates, _, _ = make_inputs(11, key_dim=key_dim, value_dim=value_dim)
    with pytest.raises(ValueError, match=message):
        chunk_delta_rule(q, k, v, beta, **gates, impl="pallas_gpu")
