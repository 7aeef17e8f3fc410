"""2-D tile algebra for the bodies of Pallas kernels (Triton and Mosaic TPU), shared by the families'
chunk math.

Everything here acts on one chunk of one (batch, head): [C, D] tiles, [C, 1] columns and [C, C]
masks, plain jnp with no reshapes, transposes or slices of a tile (the Triton lowering has none),
no scans and no `lax.linalg`. Matmuls accumulate in float32; float32 operands run at full precision.
The matmuls and `as_row` also take batches [..., M, K] (einsum, swapaxes), so that algebra written
once runs on kernel tiles and on the XLA paths' chunk-major arrays alike (`chunked.mm` is `matmul`).
Math that a kernel differentiates with `jax.vjp` passes `differentiable(matmul_dtype)` as its
matmul_dtype, so that its transposed matmuls also take operands of one dtype.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Tokens per block on which per-key decays are taken elementwise ([c, c, D] temporaries); 16 is also
# the smallest tensor-core matmul edge.
SUB_BLOCK = 16


class _Differentiable(NamedTuple):
    dtype: jnp.dtype


def differentiable(matmul_dtype):
    """The matmul_dtype for math that a kernel body differentiates (`jax.vjp`): the matmuls get a
    custom VJP that casts their float32 cotangent to matmul_dtype before its two dots (float32
    accumulation). jax's own transpose of a bfloat16 matmul would multiply the float32 cotangent by
    a bfloat16 operand, which the Triton lowering rejects ("a and b must have the same element
    type"). Only inside a differentiated function: a custom VJP left undifferentiated in a kernel
    body does not lower to Triton (no rule for custom_vjp_call), so forward kernels pass the dtype."""
    return _Differentiable(jnp.dtype(matmul_dtype))


# The three matmul forms, by the operands' axes: for 2-D tiles, dot_general's contracting dimensions;
# for batches [..., M, K], einsum specs (`matmul_tn` avoids "tn" on a batch).
_TILE_CONTRACT = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}
_BATCH_SPEC = {"nn": "...mk,...kn->...mn", "nt": "...mk,...nk->...mn", "tn": "...km,...kn->...mn"}


def _dot_operands(a, b, form, matmul_dtype):
    """a, b both cast to matmul_dtype; float32 accumulation; float32 operands at full precision
    (no TF32/bf16 passes). Both operands share one dtype, which the Triton lowering requires."""
    precision = lax.Precision.HIGHEST if matmul_dtype == jnp.float32 else lax.Precision.DEFAULT
    a, b = a.astype(matmul_dtype), b.astype(matmul_dtype)
    if a.ndim == b.ndim == 2:
        return lax.dot_general(a, b, (_TILE_CONTRACT[form], ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)
    return jnp.einsum(_BATCH_SPEC[form], a, b, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_with_vjp(a, b, form, matmul_dtype):
    return _dot_operands(a, b, form, matmul_dtype)


def _dot_with_vjp_forward(a, b, form, matmul_dtype):
    return _dot_operands(a, b, form, matmul_dtype), (a, b)


def _dot_with_vjp_backward(form, matmul_dtype, residuals, g):
    """The two transposed dots, with the float32 cotangent g cast to matmul_dtype."""
    a, b = residuals
    g = g.astype(matmul_dtype)
    dot = functools.partial(_dot_operands, matmul_dtype=matmul_dtype)
    if form == "nn":  # a b: da = g b^T, db = a^T g
        da, db = dot(g, b, "nt"), dot(a, g, "tn")
    elif form == "nt":  # a b^T: da = g b, db = g^T a
        da, db = dot(g, b, "nn"), dot(g, a, "tn")
    else:  # a^T b: da = b g^T, db = a g
        da, db = dot(b, g, "nt"), dot(a, g, "nn")
    return da.astype(a.dtype), db.astype(b.dtype)


_dot_with_vjp.defvjp(_dot_with_vjp_forward, _dot_with_vjp_backward)


def _dot(a, b, form, matmul_dtype):
    if isinstance(matmul_dtype, _Differentiable):
        return _dot_with_vjp(a, b, form, matmul_dtype.dtype)
    return _dot_operands(a, b, form, jnp.dtype(matmul_dtype))


def matmul(a, b, matmul_dtype=jnp.float32):  # [..., M, K] @ [..., K, N]
    return _dot(a, b, "nn", matmul_dtype)


def matmul_nt(a, b, matmul_dtype=jnp.float32):  # [..., M, K] @ [..., N, K]^T
    return _dot(a, b, "nt", matmul_dtype)


def matmul_tn(a, b, matmul_dtype=jnp.float32):  # [..., K, M]^T @ [..., K, N]
    """On a batch, `a` is transposed explicitly: XLA on CPU runs a dot contracting both operands'
    rows on a slow generic path. The barrier keeps that transpose a plain copy: fused into the op
    producing `a` (masks, exps) it became a scalar loop that cost the delta rule's backward pass a
    fifth of its time. A tile is never transposed (kernels have no transposes)."""
    if a.ndim == b.ndim == 2:
        return _dot(a, b, "tn", matmul_dtype)
    return matmul(jnp.swapaxes(lax.optimization_barrier(a), -1, -2), b, matmul_dtype)


def causal(rows: int, cols: int):
    """[rows, cols] bool, True where row >= col."""
    return lax.broadcasted_iota(jnp.int32, (rows, cols), 0) >= lax.broadcasted_iota(jnp.int32, (rows, cols), 1)


def eye(size: int):
    """[size, size] bool, True on the diagonal: from iotas, so it builds inside kernel bodies too (the
    XLA paths use this one as well)."""
    return lax.broadcasted_iota(jnp.int32, (size, size), 0) == lax.broadcasted_iota(jnp.int32, (size, size), 1)


def strictly_causal(size: int):
    return causal(size, size) & ~eye(size)


def as_row(column):
    """[..., C, 1] -> [..., 1, C]: a tile without a transpose op (kernel-friendly: a masked sublane
    reduction), a batch (the XLA paths) by swapping its last two axes."""
    if column.ndim > 2:
        return jnp.swapaxes(column, -1, -2)
    return jnp.sum(jnp.where(eye(column.shape[0]), column, jnp.zeros_like(column)), axis=0, keepdims=True)


def as_column(row):
    """[1, C] -> [C, 1] without a transpose op (a masked lane reduction)."""
    return jnp.sum(jnp.where(eye(row.shape[1]), row, jnp.zeros_like(row)), axis=1, keepdims=True)


def masked_sums(x, mask):
    """out[i] = sum_j mask[i, j] x[j] for x [C, W] float32 and mask [C, C] bool: a matmul for a wide
    x, a masked row sum for a column (too narrow for a matmul tile). Kernels have no scans."""
    if x.shape[1] == 1:
        return jnp.sum(jnp.where(mask, as_row(x), 0.0), axis=1, keepdims=True)
    return matmul(mask.astype(jnp.float32), x)


def cumulative_gates(log_g):
    """G_i = sum_{j <= i} log_g_j over the chunk, [C, W] -> [C, W] float32."""
    size = log_g.shape[0]
    return masked_sums(log_g, causal(size, size))


def decay_to_chunk_end(log_g):
    """sum_{s > j} log_g_s, i.e. G_last - G_j, summed directly rather than as that difference
    (whose gradient would cancel large terms). [C, W] -> [C, W] float32."""
    size = log_g.shape[0]
    return masked_sums(log_g, ~causal(size, size))


def pairwise_decays(gates, mask):
    """[c, c, D] float32: exp(G_id - G_jd) where mask[i, j], else 0, for gates G [c, D] float32
    (cumulative log decays, non-increasing along c) and mask [c, c] bool, true only where j < i, so
    every exponential is <= 1: per-key decays taken elementwise on a block of SUB_BLOCK tokens,
    without factorisation, so any gate magnitude is exact."""
    return jnp.exp(jnp.where(mask[:, :, None], gates[:, None, :] - gates[None, :, :], -jnp.inf))


def decayed_products(x, k, decays):
    """out[i, j] = sum_d x_id k_jd decays[i, j, d], [c, c] float32, for x, k [c, D] float32 and
    decays [c, c, D] (`pairwise_decays`)."""
    return jnp.sum(x[:, None, :] * k[None, :, :] * decays, axis=2)


def self_products(x, k):
    """[c, c] float32 with x_i.k_i on the diagonal, 0 elsewhere, for x, k [c, D] float32. A token
    reads itself undecayed: keeping exp(G_i - G_i) out of the graph keeps its gradient, +t and -t
    through G_i, from leaving rounding noise in the gate's gradient that swamps the true, tiny one
    under strong decay."""
    return jnp.where(eye(x.shape[0]), jnp.sum(x * k, axis=1, keepdims=True), 0.0)


def pair_products(row_tiles, column_tiles, gates, groups):
    """Decayed products under a decay per key, for every pair of a row tile x and a column tile y:
    [[sum_d x_id y_jd exp(G_id - G_jd) for j < i in one segment, x_i.y_i for j = i, 0 above, for y
    in column_tiles] for x in row_tiles], each [C, C] float32; x, y [C, K] float32, gates G [C, K]
    (cumulative, non-increasing), groups [C, 1] int32. 2-D tiles only. The pairs share their
    exponentials.

    A chunk of one sub-block (C <= SUB_BLOCK, the GPU kernel's) is one elementwise [C, C, K] block
    (`pairwise_decays`), without slices, which the Triton lowering cannot take. A longer chunk goes
    by sub-blocks of SUB_BLOCK rows (sublane slices): against their own columns elementwise; against
    the earlier tokens j < s, s the sub-block's first token, as matmuls factored around
    G_ref = G_{s-1}, so that exp(G_i - G_ref) and exp(G_ref - G_j) are both <= 1. The products do
    not depend on G_ref, so it takes no gradient (`stop_gradient`): it would only be two cancelling
    terms. A sub-block's own [c, c] block reaches its columns of the [c, C] row through an exact 0/1
    matmul rather than a concatenation along the lanes.
    """
    size = gates.shape[0]

    def own_block(rows, columns, gates, groups):
        decays = pairwise_decays(gates, strictly_causal(groups.shape[0]) & (groups == as_row(groups)))
        return [[decayed_products(x, y, decays) + self_products(x, y) for y in columns] for x in rows]

    if size <= SUB_BLOCK:
        return own_block(row_tiles, column_tiles, gates, groups)
    token = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    row_blocks = []
    for start in range(0, size, SUB_BLOCK):
        rows = slice(start, min(start + SUB_BLOCK, size))
        placement = (lax.broadcasted_iota(jnp.int32, (rows.stop - start, size), 1)
                     == lax.broadcasted_iota(jnp.int32, (rows.stop - start, size), 0) + start).astype(jnp.float32)
        own = own_block([x[rows] for x in row_tiles], [y[rows] for y in column_tiles], gates[rows], groups[rows])
        blocks = [[matmul(block, placement) for block in by_row] for by_row in own]
        if start:
            reference = lax.stop_gradient(gates[start - 1:start])
            to_reference = jnp.exp(gates[rows] - reference)
            before = token < start
            from_reference = jnp.where(before, jnp.exp(jnp.where(before, reference - gates, -jnp.inf)), 0.0)
            same_group = groups[rows] == as_row(groups)
            blocks = [[block + jnp.where(same_group, matmul_nt(x[rows] * to_reference, y * from_reference), 0.0)
                       for block, y in zip(by_row, column_tiles, strict=True)]
                      for by_row, x in zip(blocks, row_tiles, strict=True)]
        row_blocks.append(blocks)
    return [[jnp.concatenate([blocks[r][c] for blocks in row_blocks], axis=0) for c in range(len(column_tiles))]
            for r in range(len(row_tiles))]
