"""Building blocks of the kernel families' chunked XLA paths, in the chunk-major layout.

Chunk-major is [N,B,H,C,D] (chunks, batch, heads, chunk length, feature): the batch axes of every
matmul lead and each chunk's [C,D] tile is contiguous, so inputs are transposed once, by plain
copies, and everything after works in place (on CPU a transpose fused into an op that computes exps
runs as a scalar loop, several times slower). Per-token masks broadcast over heads as [N,B,1,C,1].
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

CHUNK_AXIS = 3


def chunk_major(a, chunk: int):
    """[B,Tp,H,D] -> [N,B,H,C,D]."""
    batch, padded = a.shape[:2]
    return a.reshape((batch, padded // chunk, chunk) + a.shape[2:]).transpose(1, 0, 3, 2, 4)


def time_major(a):
    """[N,B,H,C,D] -> [B,Tp,H,D]."""
    chunks, batch, heads, chunk, dim = a.shape
    return a.transpose(1, 0, 3, 2, 4).reshape(batch, chunks * chunk, heads, dim)


def dot(spec, a, b, matmul_dtype):
    """einsum with float32 accumulation; float32 operands at full precision (no TF32/bf16 passes)."""
    precision = lax.Precision.HIGHEST if matmul_dtype == jnp.float32 else lax.Precision.DEFAULT
    return jnp.einsum(spec, a.astype(matmul_dtype), b.astype(matmul_dtype),
                      precision=precision, preferred_element_type=jnp.float32)


def mm(a, b, matmul_dtype=jnp.float32):  # [..., M, K] x [..., K, N]
    return dot("...mk,...kn->...mn", a, b, matmul_dtype)


def mm_nt(a, b, matmul_dtype=jnp.float32):  # [..., M, K] x [..., N, K]^T
    return dot("...mk,...nk->...mn", a, b, matmul_dtype)


def mm_tn(a, b, matmul_dtype=jnp.float32):  # [..., K, M]^T x [..., K, N]
    """XLA on CPU runs a dot contracting both operands' rows on a slow generic path; the explicit
    transpose fuses into the op producing `a` and the dot takes the fast one (2x here)."""
    return mm(jnp.swapaxes(a, -1, -2), b, matmul_dtype)


def prefix_sums(x, reverse=False):
    """Inclusive prefix sums along the chunk axis.

    `associative_scan`, as `jnp.cumsum` lowers on CPU to a `reduce_window` quadratic in the chunk
    length. The barriers keep its input and output materialised: left to fuse, XLA re-evaluates
    the producer of the input (exps, products) inside each of the scan's log2(C) levels, and the
    scan's levels inside every consumer, which made the GLA backward pass 1.5x slower.
    """
    summed = lax.associative_scan(jnp.add, lax.optimization_barrier(x), axis=CHUNK_AXIS, reverse=reverse)
    return lax.optimization_barrier(summed)


def shift(x, step: int):
    """Moves entries `step` places along the chunk axis (later if > 0), filling with zeros."""
    size = x.shape[CHUNK_AXIS]
    kept = lax.slice_in_dim(x, 0, size - step, axis=CHUNK_AXIS) if step > 0 else \
        lax.slice_in_dim(x, -step, size, axis=CHUNK_AXIS)
    pad = [(0, 0)] * x.ndim
    pad[CHUNK_AXIS] = (step, 0) if step > 0 else (0, -step)
    return jnp.pad(kept, pad)


def eye(size: int):
    return lax.broadcasted_iota(jnp.int32, (size, size), 0) == lax.broadcasted_iota(jnp.int32, (size, size), 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMasks:
    """Who reads whom inside a chunk. earlier [N,B,1,C,C]: j < i in the same segment; reads_state
    [N,B,1,C,1]: the token sees the carried-in state; writes_state: its segment is still open at
    the chunk end; keeps_state [N,B,1,1,1]: the carried-in state survives the chunk."""

    earlier: jax.Array
    reads_state: jax.Array
    writes_state: jax.Array
    keeps_state: jax.Array


def segment_masks(groups) -> SegmentMasks:
    """From chunk-relative reset groups [N,B,1,C,1] int32 (see `segments`)."""
    size = groups.shape[CHUNK_AXIS]
    later = lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1)
    token_groups = groups[:, :, 0, :, 0]
    same = token_groups[:, :, :, None] == token_groups[:, :, None, :]
    last_group = jnp.max(groups, axis=CHUNK_AXIS, keepdims=True)  # groups never decrease along a row
    return SegmentMasks(
        earlier=(later & same)[:, :, None],
        reads_state=groups == 0,
        writes_state=groups == last_group,
        keeps_state=last_group == 0,
    )
