"""A family's chunk math as Pallas Mosaic TPU kernels: a forward sweep and a reverse backward sweep.

Grid (B, H, N), H the value heads: the two leading axes are independent ("parallel", split across
TensorCores; under grouped value heads the index maps point q and k at the head a value head reads),
the chunk axis is a sequential ("arbitrary") sweep whose carried state lives in a VMEM scratch
buffer. Each grid step holds one chunk's [C, D] tiles; C and the feature dims are the tiled (sublane,
lane) dimensions thanks to the head-major layout. The backward kernel sweeps the chunks in reverse
(its index maps read chunk N-1-n), carrying dS. Off a TPU it runs in Pallas' generic interpreter,
as the GPU kernels do: the kernels hold no DMA, semaphore or second core, which are what the
TPU-semantics interpreter (`pltpu.InterpretParams`) adds, and the generic one fills scratch and
out-of-bounds blocks with NaN as well, at about half the cost (a gated delta rule's fwd+bwd on a
small problem: 1.7 s instead of 3.2 s to compile and run, 2026-12-03).

The sweeps run a family's chunk math, on the inputs and states described in `kernel_vjp`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.pallas_kernels import layout, registry


def supports(call) -> str | None:
    if call.chunk_size % 8:
        return f"chunk_size {call.chunk_size} is not a multiple of 8 (TPU sublane tiling)"
    return None


def _params(**kwargs):
    return dict(interpret=registry.interpret_off_device("tpu"),
                compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
                **kwargs)


def _chunk_at(n, reverse):
    """The chunk a grid step reads: n, or N-1-n for the reverse sweep."""
    return pl.num_programs(2) - 1 - n if reverse else n


def _tile_spec(array, heads, chunk, reverse=False):
    """[B,H,Tp,D] arrays, one chunk per grid step; a [B,Hk,Tp,K] q or k at the head that the grid
    step's value head reads (`layout.tile_head`)."""
    tile_heads = array.shape[1]
    return pl.BlockSpec((None, None, chunk, array.shape[-1]),
                        lambda b, h, n: (b, layout.tile_head(h, tile_heads, heads), _chunk_at(n, reverse), 0))


def _group_spec(chunk, reverse=False):
    """groups [B,Tp,1], shared by all heads."""
    return pl.BlockSpec((None, chunk, 1), lambda b, h, n: (b, _chunk_at(n, reverse), 0))


def _state_spec(value_dim, key_dim):
    """A (batch, head)'s [V, K] state, the same block at every grid step."""
    return pl.BlockSpec((None, None, value_dim, key_dim), lambda b, h, n: (b, h, 0, 0))


def _chunk_state_spec(value_dim, key_dim, reverse=False):
    """[B,H,N,V,K]: the state entering the grid step's chunk."""
    return pl.BlockSpec((None, None, None, value_dim, key_dim), lambda b, h, n: (b, h, _chunk_at(n, reverse), 0, 0))


def _dims(tiles, chunk):
    """(batch, value heads, chunk count, K, V) of head-major tiles."""
    batch, heads, padded, value_dim = tiles[2].shape
    return batch, heads, padded // chunk, tiles[0].shape[-1], value_dim


def _forward_kernel(*refs, chunk_forward, tile_count, matmul_dtype):
    tile_refs = refs[:tile_count]
    group_ref, state0_ref, out_ref, final_ref, incoming_ref, state_ref = refs[tile_count:]
    chunk_index = pl.program_id(2)

    @pl.when(chunk_index == 0)
    def _():
        state_ref[...] = state0_ref[...]

    incoming_ref[...] = state_ref[...]
    out, state = chunk_forward(*(ref[...] for ref in tile_refs), group_ref[...], state_ref[...], matmul_dtype)
    out_ref[...] = out.astype(out_ref.dtype)
    state_ref[...] = state

    @pl.when(chunk_index == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state


def _backward_kernel(*refs, chunk_backward, tile_count, matmul_dtype):
    tile_refs = refs[:tile_count]
    group_ref, incoming_ref, d_out_ref, d_final_ref = refs[tile_count:tile_count + 4]
    d_tile_refs = refs[tile_count + 4:2 * tile_count + 4]
    d_state0_ref, d_state_ref = refs[2 * tile_count + 4:]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = d_final_ref[...]

    *d_tiles, d_state = chunk_backward(
        *(ref[...] for ref in tile_refs), group_ref[...], incoming_ref[...], d_out_ref[...].astype(jnp.float32),
        d_state_ref[...], matmul_dtype)
    for ref, gradient in zip(d_tile_refs, d_tiles, strict=True):
        ref[...] = gradient.astype(ref.dtype)
    d_state_ref[...] = d_state

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        d_state0_ref[...] = d_state


def builders(chunk_math, name: str):
    """(forward, backward) pallas_call builders for `kernel_vjp` from a family's chunk math module."""

    def forward(tiles, groups, state0, chunk):
        batch, heads, chunks, key_dim, value_dim = _dims(tiles, chunk)
        q = tiles[0]
        kernel = functools.partial(_forward_kernel, chunk_forward=chunk_math.chunk_forward, tile_count=len(tiles),
                                   matmul_dtype=layout.matmul_dtype(q.dtype))
        return pl.pallas_call(
            kernel,
            grid=(batch, heads, chunks),
            in_specs=[*(_tile_spec(a, heads, chunk) for a in tiles), _group_spec(chunk),
                      _state_spec(value_dim, key_dim)],
            out_specs=[_tile_spec(tiles[2], heads, chunk), _state_spec(value_dim, key_dim),
                       _chunk_state_spec(value_dim, key_dim)],
            out_shape=[jax.ShapeDtypeStruct(tiles[2].shape, q.dtype),
                       jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32),
                       jax.ShapeDtypeStruct((batch, heads, chunks, value_dim, key_dim), jnp.float32)],
            scratch_shapes=[pltpu.VMEM((value_dim, key_dim), jnp.float32)],
            **_params(name=f"{name}_forward_tpu"),
        )(*tiles, groups, state0)

    def backward(tiles, groups, incoming, d_out, d_final, chunk):
        batch, heads, chunks, key_dim, value_dim = _dims(tiles, chunk)
        kernel = functools.partial(_backward_kernel, chunk_backward=chunk_math.chunk_backward,
                                   tile_count=len(tiles), matmul_dtype=layout.matmul_dtype(tiles[0].dtype))
        tile_spec = functools.partial(_tile_spec, heads=heads, chunk=chunk, reverse=True)
        d_tile_shapes = [layout.gradient_per_value_head(a, heads) for a in tiles]
        *d_tiles, d_state0 = pl.pallas_call(
            kernel,
            grid=(batch, heads, chunks),
            in_specs=[*map(tile_spec, tiles), _group_spec(chunk, reverse=True),
                      _chunk_state_spec(value_dim, key_dim, reverse=True), tile_spec(d_out),
                      _state_spec(value_dim, key_dim)],
            out_specs=[*map(tile_spec, d_tile_shapes), _state_spec(value_dim, key_dim)],
            out_shape=[*d_tile_shapes, jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim), jnp.float32)],
            scratch_shapes=[pltpu.VMEM((value_dim, key_dim), jnp.float32)],
            **_params(name=f"{name}_backward_tpu"),
        )(*tiles, groups, incoming, d_out, d_final)
        return tuple(map(layout.shared_head_gradient, d_tiles, tiles)), d_state0

    return forward, backward
