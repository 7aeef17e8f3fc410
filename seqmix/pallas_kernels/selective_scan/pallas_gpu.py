"""The selective scan's forward sweep as a Pallas GPU kernel (Triton lowering); the backward is
the xla path's reverse sweep, from the chunk-start states the kernel stores (a first step, stated
as such: the backward runs as XLA scans).

Grid (B, D / BLOCK): one program per (row, block of BLOCK channels) walks the tokens
(`lax.fori_loop`), the [BLOCK, N] float32 state in registers, each token's x and dt read as a
[BLOCK, 1] column of channel-major [D, T] tiles and its B and C as a [1, N] row; it writes y and
the state entering every chunk. The per-token coefficients are `step.coefficients`, so both
updates (Mamba's, Longhorn's) run on it. Triton tiles need powers of two of at least 16:
`supports` checks N, and D must be a multiple of BLOCK. Off a GPU it runs in the Pallas
interpreter. Not timed on a GPU yet (none was at hand when it was written).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.selective_scan.step import coefficients
from seqmix.pallas_kernels.selective_scan.xla import chunked_implementation

BLOCK = 16  # channels per program


def supports(call) -> str | None:
    if call.key_dim < 16 or call.key_dim & (call.key_dim - 1):
        return f"N={call.key_dim}: Triton tiles need powers of two >= 16"
    if call.value_dim % BLOCK:
        return f"D={call.value_dim} is not a multiple of {BLOCK}"
    return None


def _kernel(*refs, update, chunk):
    x_ref, dt_ref, B_ref, C_ref, keep_ref = refs[:5]
    A = refs[5][...] if update == "mamba" else None
    state0_ref, y_ref, final_ref, starts_ref = refs[-4:]

    def chunk_step(index, state):
        starts_ref[index] = state

        def token(i, state):
            column = pl.ds(index * chunk + i, 1)
            x_t, dt_t, B_t, C_t = x_ref[:, column], dt_ref[:, column], B_ref[column, :], C_ref[column, :]
            decay, weight = coefficients(update, A, dt_t, B_t)
            state = decay * (state * keep_ref[:, column]) + weight * x_t * B_t
            y_ref[:, column] = jnp.sum(state * C_t, axis=1, keepdims=True)
            return state

        return lax.fori_loop(0, chunk, token, state)

    final_ref[...] = lax.fori_loop(0, starts_ref.shape[0], chunk_step, state0_ref[...])


def _forward(update, A, state0, x, dt, B, C, keep):
    """`xla._forward`'s contract (inputs [NC, C, Bt, ...], chunk then position) by the kernel."""
    n_chunks, chunk, batch, channels = x.shape
    state_dim, padded = B.shape[-1], n_chunks * chunk
    channel_major = lambda a: a.transpose(2, 3, 0, 1).reshape(batch, a.shape[3], padded)  # [Bt, D or 1, Tp]
    rows = lambda a: a.transpose(2, 0, 1, 3).reshape(batch, padded, state_dim)  # [Bt, Tp, N]
    sequence = lambda width: pl.BlockSpec((None, width, padded), lambda b, j: (b, j, 0))
    state_spec = pl.BlockSpec((None, BLOCK, state_dim), lambda b, j: (b, j, 0))
    in_specs = [sequence(BLOCK)] * 2 + [pl.BlockSpec((None, padded, state_dim), lambda b, j: (b, 0, 0))] * 2
    in_specs += [pl.BlockSpec((None, 1, padded), lambda b, j: (b, 0, 0))]
    operands = [channel_major(x), channel_major(dt), rows(B), rows(C), channel_major(keep[..., None])]
    if A is not None:
        in_specs.append(pl.BlockSpec((BLOCK, state_dim), lambda b, j: (j, 0)))
        operands.append(A)
    y, final_state, chunk_starts = pl.pallas_call(
        lambda *refs: _kernel(*refs, update=update, chunk=chunk),
        grid=(batch, channels // BLOCK),
        in_specs=in_specs + [state_spec],
        out_specs=[sequence(BLOCK), state_spec,
                   pl.BlockSpec((None, n_chunks, BLOCK, state_dim), lambda b, j: (b, 0, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, channels, padded), jnp.float32),
                   jax.ShapeDtypeStruct(state0.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, n_chunks, channels, state_dim), jnp.float32)],
        interpret=registry.interpret_off_device("gpu"),
        compiler_params=pl_triton.CompilerParams(num_warps=1, num_stages=1),
    )(*operands, state0)
    y = y.reshape(batch, channels, n_chunks, chunk).transpose(2, 3, 0, 1)
    return y, final_state, chunk_starts.transpose(1, 0, 2, 3)


selective_scan_pallas_gpu = chunked_implementation(_forward)
