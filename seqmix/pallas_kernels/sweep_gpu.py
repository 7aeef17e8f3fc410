"""A family's chunk math as Pallas GPU kernels (Triton lowering): a forward and a reverse backward sweep.

Why Triton and not Mosaic GPU: Mosaic GPU, the default lowering of current jax, targets Hopper
only and asks the kernel to orchestrate warpgroups, TMA copies and WGMMA layouts by hand; the
Triton lowering compiles the same block-level program for Ampere and Hopper alike (the A100s and
H100s our users train on) and lets Triton schedule the tensor-core pipeline. It is deprecated
upstream (jax warns at lowering), so this file is the one to port when it goes; the families'
chunk math is lowering-agnostic.

Grid (B, H, V / Vb): one program per (batch, value head, slice of Vb value columns) sweeps the
sequence chunk by chunk (`lax.fori_loop`, each chunk's [C, D] tiles loaded through ref slices) with
its [Vb, K] float32 slice of the state in registers, storing the slice entering every chunk for the
backward pass, which sweeps in reverse carrying dS. Every value column of the state evolves on its
own (the gates, beta, and the delta rule's and DPLR's key-side reads act on each column alike), so
the slices are exact; each program recomputes the chunk's key-side work, and the backward pass sums
the slices' key-side gradients (dq, dk, the per-token inputs') in float32. Under grouped value heads
the index maps point q and k at the head a value head reads.
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
# 1.7-7 KB (per program, twice the threads counted: 2.3-5.9 MB -> 0.4-1.8 MB); the forward kernels'
# spills went to none or nearly. Sixteen warps spill more per program in every kernel but KDA's
# backward at K = V = 128. Chosen from that report, not timed.
NUM_WARPS = 8


def _params(**kwargs):
    return dict(interpret=registry.interpret_off_device("gpu"),
                compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=2), **kwargs)


# The most value columns one program holds (fla's BV): wider heads split across programs. At
# K = V = 128 (Qwen3-Next's and Kimi Linear's heads) the whole [V, K] state spilled 24-62 KB a thread
# in five of the six delta-family kernels with eight warps (`gpu_resources.py`, Triton 3.6); slices of
# 64 columns cut the forward kernels' spills to 0.3-2.6 KB, and DPLR's backward kernel then asks for
# 174 KiB of shared memory instead of 258 (Hopper allows 227). Chosen from that report, not timed:
# `benchmarks/gpu.py` times the whole-state kernels beside the split ones on a GPU.
VALUE_BLOCK = 64


def value_block(value_dim: int) -> int:
    """The value columns per program, Vb: V itself up to VALUE_BLOCK (V and VALUE_BLOCK are powers of two)."""
    return min(value_dim, VALUE_BLOCK)


def _row_spec(array, heads):
    """A (batch, value head)'s whole [Tp, D] sequence of a [B,H,Tp,D] key-side array (q, k, a per-token
    input), or of the head it reads in a [B,Hk,Tp,K] q or k (`layout.tile_head`)."""
    tile_heads = array.shape[1]
    return pl.BlockSpec((None, None, *array.shape[2:]),
                        lambda b, h, j: (b, layout.tile_head(h, tile_heads, heads), 0, 0))


def _value_spec(array, block):
    """A program's [Tp, Vb] columns of a [B,H,Tp,V] value-side array (v, the output, its cotangent)."""
    return pl.BlockSpec((None, None, array.shape[2], block), lambda b, h, j: (b, h, 0, j))


def _group_spec(groups):
    """groups [B,Tp,1], shared by all heads."""
    return pl.BlockSpec((None, *groups.shape[1:]), lambda b, h, j: (b, 0, 0))


def _state_spec(block, key_dim, chunks=None):
    """A program's [Vb, K] rows of the states [B,H,V,K], or of the states entering every chunk
    [B,H,N,V,K] (chunks = N)."""
    if chunks is None:
        return pl.BlockSpec((None, None, block, key_dim), lambda b, h, j: (b, h, j, 0))
    return pl.BlockSpec((None, None, chunks, block, key_dim), lambda b, h, j: (b, h, 0, j, 0))


def _slice_gradient_spec(shape):
    """A program's [Tp, D] key-side gradient in [B,H,n,Tp,D] (one per slice of value columns)."""
    return pl.BlockSpec((None, None, None, *shape[3:]), lambda b, h, j: (b, h, j, 0, 0))


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


VALUE_TILE = 2  # tiles = (q, k, v, *per_token) (`kernel_vjp`): v is the one value-side tile


def _tile_specs(tiles, heads, block):
    return [_value_spec(tile, block) if index == VALUE_TILE else _row_spec(tile, heads)
            for index, tile in enumerate(tiles)]


def builders(chunk_math, name: str):
    """(forward, backward) pallas_call builders for `kernel_vjp` from a family's chunk math module."""

    def forward(tiles, groups, state0, chunk):
        q, (batch, heads, padded, value_dim) = tiles[0], tiles[VALUE_TILE].shape
        key_dim, block, chunks = q.shape[-1], value_block(value_dim), padded // chunk
        kernel = functools.partial(_forward_kernel, chunk_forward=chunk_math.chunk_forward, tile_count=len(tiles),
                                   chunk=chunk, matmul_dtype=layout.matmul_dtype(q.dtype))
        out_shape = [jax.ShapeDtypeStruct((batch, heads, padded, value_dim), q.dtype),
                     jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, heads, chunks, value_dim, key_dim), jnp.float32)]
        return pl.pallas_call(
            kernel,
            grid=(batch, heads, value_dim // block),
            in_specs=[*_tile_specs(tiles, heads, block), _group_spec(groups), _state_spec(block, key_dim)],
            out_specs=[_value_spec(out_shape[0], block), _state_spec(block, key_dim),
                       _state_spec(block, key_dim, chunks)],
            out_shape=out_shape,
            **_params(name=f"{name}_forward_gpu"),
        )(*tiles, groups, state0)

    def backward(tiles, groups, incoming, d_out, d_final, chunk):
        q, (batch, heads, padded, value_dim) = tiles[0], tiles[VALUE_TILE].shape
        key_dim, block, chunks = q.shape[-1], value_block(value_dim), padded // chunk
        slices = value_dim // block
        # A key-side tile's gradient per value head and slice of value columns, summed afterwards (one
        # more [B,H,Tp,K] float32 array per slice); v's, per program, is whole.
        d_tile_shapes = [jax.ShapeDtypeStruct(tile.shape, tile.dtype) if index == VALUE_TILE else
                         layout.gradient_per_value_head(tile, heads, slices) for index, tile in enumerate(tiles)]
        d_tile_specs = [_value_spec(shape, block) if index == VALUE_TILE else _slice_gradient_spec(shape.shape)
                        for index, shape in enumerate(d_tile_shapes)]
        kernel = functools.partial(_backward_kernel, chunk_backward=chunk_math.chunk_backward,
                                   tile_count=len(tiles), chunk=chunk, matmul_dtype=layout.matmul_dtype(q.dtype))
        *d_tiles, d_state0 = pl.pallas_call(
            kernel,
            grid=(batch, heads, slices),
            in_specs=[*_tile_specs(tiles, heads, block), _group_spec(groups), _state_spec(block, key_dim, chunks),
                      _value_spec(d_out, block), _state_spec(block, key_dim)],
            out_specs=[*d_tile_specs, _state_spec(block, key_dim)],
            out_shape=[*d_tile_shapes, jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32)],
            **_params(name=f"{name}_backward_gpu"),
        )(*tiles, groups, incoming, d_out, d_final)
        d_tiles = [d if index == VALUE_TILE else layout.shared_head_gradient(d, tile)
                   for index, (d, tile) in enumerate(zip(d_tiles, tiles, strict=True))]
        return tuple(d_tiles), d_state0

    return forward, backward
