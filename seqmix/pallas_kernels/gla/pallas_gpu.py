"""Gated linear attention as Pallas GPU kernels (Triton lowering), forward and backward.

Why Triton and not Mosaic GPU: Mosaic GPU, the default lowering of current jax, targets Hopper
only and asks the kernel to orchestrate warpgroups, TMA copies and WGMMA layouts by hand; the
Triton lowering compiles the same block-level program for Ampere and Hopper alike (the A100s and
H100s our users train on) and lets Triton schedule the tensor-core pipeline. It is deprecated
upstream (jax warns at lowering), so this file is the one to port when it goes; the chunk math in
`chunk_math` is lowering-agnostic.

Grid (B, H): one program per (batch, head) sweeps the sequence in 16-token chunks with the
[V, K] float32 state in registers, storing the state entering every chunk for the backward pass,
which sweeps in reverse carrying dS. A chunk is one 16-token sub-block (`chunk_math.SUB_BLOCK`)
because Triton cannot slice a register tile, which a longer chunk's sub-blocks would need; 16 is
also the smallest tensor-core matmul edge. Off a GPU it runs in the generic Pallas interpreter,
which matches the Triton lowering's semantics (whole-block loads and stores, no memory spaces).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.gla import chunk_math, layout
from seqmix.pallas_kernels.gla.kernel_vjp import kernel_implementation

CHUNK = chunk_math.SUB_BLOCK


def supports(call) -> str | None:
    for name, size in (("K", call.key_dim), ("V", call.value_dim)):
        if size < 16 or size & (size - 1):
            return f"{name}={size}: Triton tiles need powers of two >= 16"
    return None


def _params(**kwargs):
    return dict(interpret=registry.interpret_off_device("gpu"),
                compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2), **kwargs)


def _row_spec(padded, width):
    """A (batch, head)'s whole [Tp, width] sequence of a [B,H,Tp,width] array."""
    return pl.BlockSpec((None, None, padded, width), lambda b, h: (b, h, 0, 0))


def _chunked_input_specs(padded, key_dim, value_dim, width):
    """q, k, v, log_gate and the reset groups [B,Tp,1] (shared by all heads)."""
    return [_row_spec(padded, key_dim), _row_spec(padded, key_dim), _row_spec(padded, value_dim),
            _row_spec(padded, width), pl.BlockSpec((None, padded, 1), lambda b, h: (b, 0, 0))]


def _state_spec(*shape):
    return pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))


def _chunk_rows(index):
    return pl.ds(pl.multiple_of(index * CHUNK, CHUNK), CHUNK)


def _forward_kernel(q_ref, k_ref, v_ref, gate_ref, group_ref, state0_ref,
                    out_ref, final_ref, incoming_ref, *, matmul_dtype):
    def sweep(index, state):
        rows = _chunk_rows(index)
        incoming_ref[index] = state
        out, state = chunk_math.chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], gate_ref[rows, :],
                                              group_ref[rows, :], state, matmul_dtype)
        out_ref[rows, :] = out.astype(out_ref.dtype)
        return state

    final_ref[...] = lax.fori_loop(0, q_ref.shape[0] // CHUNK, sweep, state0_ref[...])


def forward(q, k, v, log_gate, groups, state0, chunk):
    batch, heads, padded, key_dim, value_dim, width, chunks = layout.kernel_dims(q, v, log_gate, chunk)
    kernel = functools.partial(_forward_kernel, matmul_dtype=layout.matmul_dtype(q.dtype))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        in_specs=[*_chunked_input_specs(padded, key_dim, value_dim, width),
                  _state_spec(value_dim, key_dim)],
        out_specs=[_row_spec(padded, value_dim), _state_spec(value_dim, key_dim),
                   _state_spec(chunks, value_dim, key_dim)],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, value_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, chunks, value_dim, key_dim), jnp.float32)],
        **_params(name="gla_forward_gpu"),
    )(q, k, v, log_gate, groups, state0)


def _backward_kernel(q_ref, k_ref, v_ref, gate_ref, group_ref, incoming_ref, d_out_ref, d_final_ref,
                     dq_ref, dk_ref, dv_ref, d_gate_ref, d_state0_ref, *, matmul_dtype):
    chunks = q_ref.shape[0] // CHUNK

    def sweep(step, d_state):
        index = chunks - 1 - step
        rows = _chunk_rows(index)
        dq, dk, dv, d_gate, d_state = chunk_math.chunk_backward(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], gate_ref[rows, :], group_ref[rows, :],
            incoming_ref[index], d_out_ref[rows, :].astype(jnp.float32), d_state, matmul_dtype)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        d_gate_ref[rows, :] = d_gate
        return d_state

    d_state0_ref[...] = lax.fori_loop(0, chunks, sweep, d_final_ref[...])


def backward(q, k, v, log_gate, groups, incoming, d_out, d_final, chunk):
    batch, heads, padded, key_dim, value_dim, width, chunks = layout.kernel_dims(q, v, log_gate, chunk)
    kernel = functools.partial(_backward_kernel, matmul_dtype=layout.matmul_dtype(q.dtype))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        in_specs=[*_chunked_input_specs(padded, key_dim, value_dim, width),
                  _state_spec(chunks, value_dim, key_dim), _row_spec(padded, value_dim),
                  _state_spec(value_dim, key_dim)],
        out_specs=[_row_spec(padded, key_dim), _row_spec(padded, key_dim), _row_spec(padded, value_dim),
                   _row_spec(padded, width), _state_spec(value_dim, key_dim)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(log_gate.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32)],
        **_params(name="gla_backward_gpu"),
    )(q, k, v, log_gate, groups, incoming, d_out, d_final)


gla_pallas_gpu = kernel_implementation(forward, backward, tile=lambda chunk_size: CHUNK)
