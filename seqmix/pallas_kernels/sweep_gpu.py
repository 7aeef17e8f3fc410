"""A family's chunk math as Pallas GPU kernels (Triton lowering): a forward and a reverse backward sweep.

Why Triton and not Mosaic GPU: Mosaic GPU, the default lowering of current jax, targets Hopper
only and asks the kernel to orchestrate warpgroups, TMA copies and WGMMA layouts by hand; the
Triton lowering compiles the same block-level program for Ampere and Hopper alike (the A100s and
H100s our users train on) and lets Triton schedule the tensor-core pipeline. It is deprecated
upstream (jax warns at lowering), so this file is the one to port when it goes; the families'
chunk math is lowering-agnostic.

Grid (B, H): one program per (batch, value head) sweeps the sequence chunk by chunk
(`lax.fori_loop`, each chunk's [C, D] tiles loaded through ref slices) with the [V, K] float32 state
in registers, storing the state entering every chunk for the backward pass, which sweeps in reverse
carrying dS. Under grouped value heads the index maps point q and k at the head a value head reads.
Triton tiles need power-of-two sizes of at least 16, which `supports` checks of K and V; the family
picks C. Off a GPU it runs in the generic Pallas interpreter, which matches the Triton lowering's
semantics (whole-block loads and stores, no memory spaces).

The sweeps run a family's chunk math, on the inputs and states described in `kernel_vjp`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from seqmix.pallas_kernels import layout, registry


def supports(call) -> str | None:
    for name, size in (("K", call.key_dim), ("V", call.value_dim)):
        if size < 16 or size & (size - 1):
            return f"{name}={size}: Triton tiles need powers of two >= 16"
    return None


# Eight warps, not four: the [V, K] float32 state and the chunk's temporaries are spread over twice
# the threads. Compiled for sm_90 (`benchmarks/gpu_resources.py`, Triton 3.6), four warps spilled
# 17-46 KB a thread in the delta rule's, KDA's and DPLR's backward kernels at K = V = 64 and eight
# 1.7-7 KB; the forward kernels' spills went to none or nearly. Chosen from that report, not timed.
def _params(**kwargs):
    return dict(interpret=registry.interpret_off_device("gpu"),
                compiler_params=pl_triton.CompilerParams(num_warps=8, num_stages=2), **kwargs)


def _row_spec(array, heads):
    """A (batch, value head)'s whole [Tp, D] sequence of a [B,H,Tp,D] array, or of the head it reads
    in a [B,Hk,Tp,K] q or k (`layout.tile_head`)."""
    tile_heads = array.shape[1]
    return pl.BlockSpec((None, None, *array.shape[2:]), lambda b, h: (b, layout.tile_head(h, tile_heads, heads), 0, 0))


def _group_spec(groups):
    """groups [B,Tp,1], shared by all heads."""
    return pl.BlockSpec((None, *groups.shape[1:]), lambda b, h: (b, 0, 0))


def _state_spec(*shape):
    return pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))


def _chunk_rows(index, chunk):
    return pl.ds(pl.multiple_of(index * chunk, chunk), chunk)


def _forward_kernel(*refs, chunk_forward, tile_count, chunk, matmul_dtype):
    tile_refs = refs[:tile_count]
    group_ref, state0_ref, out_ref, final_ref, incoming_ref = refs[tile_count:]

    def sweep(index, state):
        rows = _chunk_rows(index, chunk)
        incoming_ref[index] = state
        out, state = chunk_forward(*(ref[rows, :] for ref in tile_refs), group_ref[rows, :], state, matmul_dtype)
        out_ref[rows, :] = out.astype(out_ref.dtype)
        return state

    final_ref[...] = lax.fori_loop(0, out_ref.shape[0] // chunk, sweep, state0_ref[...])


def _backward_kernel(*refs, chunk_backward, tile_count, chunk, matmul_dtype):
    tile_refs = refs[:tile_count]
    group_ref, incoming_ref, d_out_ref, d_final_ref = refs[tile_count:tile_count + 4]
    d_tile_refs = refs[tile_count + 4:2 * tile_count + 4]
    (d_state0_ref,) = refs[2 * tile_count + 4:]
    chunks = d_out_ref.shape[0] // chunk

    def sweep(step, d_state):
        index = chunks - 1 - step
        rows = _chunk_rows(index, chunk)
        *d_tiles, d_state = chunk_backward(
            *(ref[rows, :] for ref in tile_refs), group_ref[rows, :], incoming_ref[index],
            d_out_ref[rows, :].astype(jnp.float32), d_state, matmul_dtype)
        for ref, gradient in zip(d_tile_refs, d_tiles, strict=True):
            ref[rows, :] = gradient.astype(ref.dtype)
        return d_state

    d_state0_ref[...] = lax.fori_loop(0, chunks, sweep, d_final_ref[...])


def builders(chunk_math, name: str):
    """(forward, backward) pallas_call builders for `kernel_vjp` from a family's chunk math module."""

    def forward(tiles, groups, state0, chunk):
        q, (batch, heads, padded, value_dim) = tiles[0], tiles[2].shape
        key_dim = q.shape[-1]
        row_spec = functools.partial(_row_spec, heads=heads)
        kernel = functools.partial(_forward_kernel, chunk_forward=chunk_math.chunk_forward, tile_count=len(tiles),
                                   chunk=chunk, matmul_dtype=layout.matmul_dtype(q.dtype))
        out_shape = [jax.ShapeDtypeStruct((batch, heads, padded, value_dim), q.dtype),
                     jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, heads, padded // chunk, value_dim, key_dim), jnp.float32)]
        return pl.pallas_call(
            kernel,
            grid=(batch, heads),
            in_specs=[*map(row_spec, tiles), _group_spec(groups), _state_spec(value_dim, key_dim)],
            out_specs=[row_spec(out_shape[0]), _state_spec(value_dim, key_dim),
                       _state_spec(padded // chunk, value_dim, key_dim)],
            out_shape=out_shape,
            **_params(name=f"{name}_forward_gpu"),
        )(*tiles, groups, state0)

    def backward(tiles, groups, incoming, d_out, d_final, chunk):
        q, (batch, heads, padded, value_dim) = tiles[0], tiles[2].shape
        key_dim = q.shape[-1]
        row_spec = functools.partial(_row_spec, heads=heads)
        d_tile_shapes = [layout.gradient_per_value_head(a, heads) for a in tiles]
        kernel = functools.partial(_backward_kernel, chunk_backward=chunk_math.chunk_backward,
                                   tile_count=len(tiles), chunk=chunk, matmul_dtype=layout.matmul_dtype(q.dtype))
        *d_tiles, d_state0 = pl.pallas_call(
            kernel,
            grid=(batch, heads),
            in_specs=[*map(row_spec, tiles), _group_spec(groups), _state_spec(padded // chunk, value_dim, key_dim),
                      row_spec(d_out), _state_spec(value_dim, key_dim)],
            out_specs=[*map(row_spec, d_tile_shapes), _state_spec(value_dim, key_dim)],
            out_shape=[*d_tile_shapes, jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32)],
            **_params(name=f"{name}_backward_gpu"),
        )(*tiles, groups, incoming, d_out, d_final)
        return tuple(map(layout.shared_head_gradient, d_tiles, tiles)), d_state0

    return forward, backward
