"""Gated linear attention as Pallas Mosaic TPU kernels, forward and backward.

Grid (B, H, N): the two leading axes are independent ("parallel", split across TensorCores), the
chunk axis is a sequential ("arbitrary") sweep whose carried state lives in a VMEM scratch buffer.
Each grid step holds one chunk's [C, D] tiles; C and the feature dims are the tiled (sublane,
lane) dimensions thanks to the head-major layout. The backward kernel sweeps the chunks in reverse
(its index maps read chunk N-1-n), carrying dS, and differentiates the chunk's forward math.
Off a TPU it runs in the TPU-semantics interpreter.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.gla import chunk_math, layout
from seqmix.pallas_kernels.gla.kernel_vjp import kernel_implementation


def supports(call) -> str | None:
    if call.chunk_size % 8:
        return f"chunk_size {call.chunk_size} is not a multiple of 8 (TPU sublane tiling)"
    return None


def _params(**kwargs):
    interpret = pltpu.InterpretParams() if registry.interpret_off_device("tpu") else False
    compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return dict(interpret=interpret, compiler_params=compiler_params, **kwargs)


def _tile_spec(chunk, width, reverse=False):
    """[B,H,Tp,width] arrays, one chunk per grid step (in reverse order for the backward sweep)."""
    if reverse:
        return pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, pl.num_programs(2) - 1 - n, 0))
    return pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, n, 0))


def _group_spec(chunk, reverse=False):
    """groups [B,Tp,1], shared by all heads."""
    if reverse:
        return pl.BlockSpec((None, chunk, 1), lambda b, h, n: (b, pl.num_programs(2) - 1 - n, 0))
    return pl.BlockSpec((None, chunk, 1), lambda b, h, n: (b, n, 0))


def _state_spec(value_dim, key_dim, per_chunk=False, reverse=False):
    if not per_chunk:
        return pl.BlockSpec((None, None, value_dim, key_dim), lambda b, h, n: (b, h, 0, 0))
    if reverse:
        return pl.BlockSpec((None, None, None, value_dim, key_dim),
                            lambda b, h, n: (b, h, pl.num_programs(2) - 1 - n, 0, 0))
    return pl.BlockSpec((None, None, None, value_dim, key_dim), lambda b, h, n: (b, h, n, 0, 0))


def _forward_kernel(q_ref, k_ref, v_ref, gate_ref, group_ref, state0_ref,
                    out_ref, final_ref, incoming_ref, state_ref, *, matmul_dtype):
    chunk_index = pl.program_id(2)

    @pl.when(chunk_index == 0)
    def _():
        state_ref[...] = state0_ref[...]

    incoming_ref[...] = state_ref[...]
    out, state = chunk_math.chunk_forward(q_ref[...], k_ref[...], v_ref[...], gate_ref[...], group_ref[...],
                                          state_ref[...], matmul_dtype)
    out_ref[...] = out.astype(out_ref.dtype)
    state_ref[...] = state

    @pl.when(chunk_index == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state


def forward(q, k, v, log_gate, groups, state0, chunk):
    batch, heads, padded, key_dim, value_dim, width, chunks = layout.kernel_dims(q, v, log_gate, chunk)
    kernel = functools.partial(_forward_kernel, matmul_dtype=layout.matmul_dtype(q.dtype))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, chunks),
        in_specs=[_tile_spec(chunk, key_dim), _tile_spec(chunk, key_dim), _tile_spec(chunk, value_dim),
                  _tile_spec(chunk, width), _group_spec(chunk), _state_spec(value_dim, key_dim)],
        out_specs=[_tile_spec(chunk, value_dim), _state_spec(value_dim, key_dim),
                   _state_spec(value_dim, key_dim, per_chunk=True)],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, value_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, chunks, value_dim, key_dim), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((value_dim, key_dim), jnp.float32)],
        **_params(name="gla_forward_tpu"),
    )(q, k, v, log_gate, groups, state0)


def _backward_kernel(q_ref, k_ref, v_ref, gate_ref, group_ref, incoming_ref, d_out_ref, d_final_ref,
                     dq_ref, dk_ref, dv_ref, d_gate_ref, d_state0_ref, d_state_ref, *, matmul_dtype):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = d_final_ref[...]

    dq, dk, dv, d_gate, d_state = chunk_math.chunk_backward(
        q_ref[...], k_ref[...], v_ref[...], gate_ref[...], group_ref[...], incoming_ref[...],
        d_out_ref[...].astype(jnp.float32), d_state_ref[...], matmul_dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    d_gate_ref[...] = d_gate
    d_state_ref[...] = d_state

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        d_state0_ref[...] = d_state


def backward(q, k, v, log_gate, groups, incoming, d_out, d_final, chunk):
    batch, heads, padded, key_dim, value_dim, width, chunks = layout.kernel_dims(q, v, log_gate, chunk)
    kernel = functools.partial(_backward_kernel, matmul_dtype=layout.matmul_dtype(q.dtype))
    key_tile, value_tile, gate_tile = (_tile_spec(chunk, d, reverse=True) for d in (key_dim, value_dim, width))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, chunks),
        in_specs=[key_tile, key_tile, value_tile, gate_tile, _group_spec(chunk, reverse=True),
                  _state_spec(value_dim, key_dim, per_chunk=True, reverse=True), value_tile,
                  _state_spec(value_dim, key_dim)],
        out_specs=[key_tile, key_tile, value_tile, gate_tile, _state_spec(value_dim, key_dim)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(log_gate.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((value_dim, key_dim), jnp.float32)],
        **_params(name="gla_backward_tpu"),
    )(q, k, v, log_gate, groups, incoming, d_out, d_final)


gla_pallas_tpu = kernel_implementation(forward, backward, tile=lambda chunk_size: chunk_size)
