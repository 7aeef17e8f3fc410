"""Products of chunk-major arrays under a per-key decay, and their cotangents, for the `xla` paths
whose intra-chunk matrices carry a decay per key (the delta rule's KDA form, DPLR).

    P(x, y)_ij = sum_d x_id y_jd exp(G_id - G_jd)    for j < i in one segment,
    P(x, y)_ii = x_i.y_i,                             0 elsewhere

for several row operands x and column operands y under one gate (the delta rule's k k^T and q k^T;
DPLR's four): x, y [N,B,H,C,K] (any float dtype, computed in float32); G = to_here [N,B,H,C,K]
float32, the inclusive prefix sums of the log decays inside each chunk (`chunked.gates`); earlier
[N,B,1,C,C] bool (`chunked.SegmentMasks.earlier`). P [N,B,H,C,C] float32.

The chunk is cut into 16-token sub-blocks; R_I is the gate at the last token before sub-block I.
For the queries i of sub-block I, exp(G_i - G_j) = exp(G_i - R_I) exp(R_I - G_j), folded into x
and into one copy of y per sub-block, then one matmul. The first factor is <= 1, and so is the
second for keys before I; for keys inside I it is at most exp(sub-block I's own decay), exact while
that stays within `chunked.FACTORED_SPAN_LIMIT` nats (3.75 nats per token; Kimi's gates, up to
~1.6 per token at initialisation, stay far inside). A key channel whose sub-block decays by more
("steep") leaves its pairs inside the sub-block out of the matmul; they are added elementwise,
exp(G_i - G_j) on a masked [c, c, K] block (masked before the exp), only in blocks of chunks that
have a steep channel at all (`lax.cond`). Every exponential is <= 1 or bounded by e^60, so any
decay, -8 nats per token included, is exact. (Factoring around the chunk start instead would
overflow past 60 nats per chunk, less than one nat per token.)

Cotangents, written out: with x~ = x exp(G - R), y^ = y exp(R - G) and dP masked like P,
dx = exp(G - R) (dP y^), dy = sum_I exp(R_I - G) (dP_I^T x~_I), dG = x~ (dP y^) - sum_I y^_I (dP_I^T x~_I)
(R cancels out of P, so it takes no cotangent), and alike for the elementwise part. The factors are
computed once for all operands. The diagonal x_i.y_i stays out of the gates' graph: its
exp(G_i - G_i) would send +t and -t to G_i, whose rounding noise swamps the true gate gradient
under strong decay.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked

SUB_BLOCK = 16


def _by_block(a, blocks: int):
    """[..., C, D] -> [..., C/c, c, D]."""
    return a.reshape(a.shape[:-2] + (blocks, a.shape[-2] // blocks, a.shape[-1]))


def _square(blockwise):
    """[..., C/c, c, C] -> [..., C, C]."""
    return blockwise.reshape(blockwise.shape[:-3] + (-1, blockwise.shape[-1]))


def _self_products(x, y):
    """x_i.y_i as a [..., C, 1] column."""
    return jnp.sum(x * y, axis=-1, keepdims=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Factors:
    """rows exp(G_i - R_I) [..., C/c, c, K] (<= 1); columns exp(R_I - G_j) [..., C/c, C, K] for
    the keys before sub-block I, and inside it on channels that are not steep, 0 elsewhere; steep
    [..., C/c, K] bool: the channel decays by more than the limit inside sub-block I."""

    rows: jax.Array
    columns: jax.Array
    steep: jax.Array


def _factors(to_here) -> _Factors:
    chunk = to_here.shape[-2]
    blocks = chunk // min(SUB_BLOCK, chunk)
    gate = _by_block(to_here, blocks)
    ends = gate[..., -1, :]
    reference = jnp.concatenate([jnp.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], axis=-2)
    steep = reference - ends > chunked.FACTORED_SPAN_LIMIT
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // (chunk // blocks)
    query_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)
    usable = (key_block < query_block) | ((key_block == query_block) & ~steep[..., :, None, :])
    return _Factors(
        rows=jnp.exp(gate - reference[..., None, :]),
        columns=jnp.exp(jnp.where(usable, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf)),
        steep=steep,
    )


def _steep_decays(to_here, steep):
    """exp(G_i - G_j) [..., C/c, c, c, K] for j < i inside one sub-block on its steep channels, 0
    elsewhere (masked before the exp: every exponential <= 1)."""
    blocks = steep.shape[-2]
    gate = _by_block(to_here, blocks)
    size = gate.shape[-2]
    within = lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1)
    mask = within[..., None] & steep[..., :, None, None, :]
    return jnp.exp(jnp.where(mask, gate[..., :, None, :] - gate[..., None, :, :], -jnp.inf))


def _onto_diagonal_blocks(blockwise):
    """[..., C/c, c, c] -> [..., C, C] with the blocks on the diagonal, 0 elsewhere."""
    blocks = blockwise.shape[-3]
    block_eye = jnp.eye(blocks, dtype=blockwise.dtype)[:, None, :, None]
    return (blockwise[..., :, :, None, :] * block_eye).reshape(blockwise.shape[:-3] + (blocks * blockwise.shape[-1],) * 2)


def _diagonal_blocks(square, blocks: int):
    """[..., C, C] -> its diagonal blocks [..., C/c, c, c]."""
    size = square.shape[-1] // blocks
    tiles = square.reshape(square.shape[:-2] + (blocks, size, blocks, size))
    return jnp.moveaxis(jnp.diagonal(tiles, axis1=-4, axis2=-2), -1, -3)


def _operands(rows, columns, to_here):
    """(float32 rows and columns, x exp(G - R) [..., C/c, c, K] per row, y exp(R - G) [..., C/c, C, K]
    per column, the factors)."""
    factors = _factors(to_here)
    blocks = factors.steep.shape[-2]
    rows = [x.astype(jnp.float32) for x in rows]
    columns = [y.astype(jnp.float32) for y in columns]
    decayed = [_by_block(x, blocks) * factors.rows for x in rows]
    grown = [y[..., None, :, :] * factors.columns for y in columns]
    return rows, columns, decayed, grown, factors


def products(rows, columns, to_here, earlier):
    """[[P(x, y) for y in columns] for x in rows], each [N,B,H,C,C] float32 with x_i.y_i on its
    diagonal (see the module docstring); rows and columns: sequences of [N,B,H,C,K] arrays."""
    rows, columns, decayed, grown, factors = _operands(rows, columns, to_here)
    blocks = factors.steep.shape[-2]
    factored = [[_square(chunked.mm_nt(x, y)) for y in grown] for x in decayed]

    def steep_pairs():
        decays = _steep_decays(to_here, factors.steep)
        return [[_onto_diagonal_blocks(jnp.sum(_by_block(x, blocks)[..., :, None, :] * _by_block(y, blocks)[..., None, :, :]
                                               * decays, axis=-1)) for y in columns] for x in rows]

    steep = lax.cond(jnp.any(factors.steep), steep_pairs, lambda: jax.tree.map(jnp.zeros_like, factored))
    diagonal = chunked.eye(to_here.shape[-2])
    return [[jnp.where(diagonal, _self_products(x, y), jnp.where(earlier, p + s, 0.0))
             for y, p, s in zip(columns, by_row, steep_row, strict=True)]
            for x, by_row, steep_row in zip(rows, factored, steep, strict=True)]


def products_backward(rows, columns, to_here, earlier, d_products):
    """(d_rows, d_columns: lists of [N,B,H,C,K] float32, d_to_here [N,B,H,C,K]) of `products`, given
    d_products [[N,B,H,C,C]] nested like its result."""
    rows, columns, decayed, grown, factors = _operands(rows, columns, to_here)
    blocks = factors.steep.shape[-2]
    d_off = [[jnp.where(earlier, d, 0.0) for d in by_row] for by_row in d_products]
    d_rows = [0.0] * len(rows)
    d_columns = [0.0] * len(columns)
    d_decayed, d_grown = [0.0] * len(rows), [0.0] * len(columns)
    for r, x in enumerate(rows):
        for c, y in enumerate(columns):
            d_self = jnp.diagonal(d_products[r][c], axis1=-2, axis2=-1)[..., None]
            d_rows[r] = d_rows[r] + d_self * y
            d_columns[c] = d_columns[c] + d_self * x
            d_blocks = _by_block(d_off[r][c], blocks)  # [..., C/c, c, C]
            d_decayed[r] = d_decayed[r] + chunked.mm(d_blocks, grown[c])
            d_grown[c] = d_grown[c] + chunked.mm_tn(d_blocks, decayed[r])
    d_to_here = (sum((d * x).reshape(to_here.shape) for d, x in zip(d_decayed, decayed, strict=True))
                 - sum(jnp.sum(d * y, axis=-3) for d, y in zip(d_grown, grown, strict=True)))
    d_rows = [d + (d_x * factors.rows).reshape(to_here.shape) for d, d_x in zip(d_rows, d_decayed, strict=True)]
    d_columns = [d + jnp.sum(d_y * factors.columns, axis=-3) for d, d_y in zip(d_columns, d_grown, strict=True)]

    def steep_pairs():
        """(d_rows, d_columns) through the steep channels' elementwise pairs; their d_to_here is
        x dx - y dy, as for any product of x_i exp(G_i) and y_j exp(-G_j)."""
        decays = _steep_decays(to_here, factors.steep)
        d_x, d_y = [jnp.zeros(to_here.shape, jnp.float32) for _ in rows], [jnp.zeros(to_here.shape, jnp.float32)
                                                                         for _ in columns]
        for r, x in enumerate(rows):
            for c, y in enumerate(columns):
                weighted = _diagonal_blocks(d_off[r][c], blocks)[..., None] * decays  # [..., C/c, c, c, K]
                d_x[r] = d_x[r] + jnp.sum(weighted * _by_block(y, blocks)[..., None, :, :], axis=-2).reshape(x.shape)
                d_y[c] = d_y[c] + jnp.sum(weighted * _by_block(x, blocks)[..., :, None, :], axis=-3).reshape(y.shape)
        return d_x, d_y

    zeros = lambda: ([jnp.zeros(to_here.shape, jnp.float32) for _ in rows],
                     [jnp.zeros(to_here.shape, jnp.float32) for _ in columns])
    d_steep_rows, d_steep_columns = lax.cond(jnp.any(factors.steep), steep_pairs, zeros)
    d_to_here = (d_to_here + sum(d * x for d, x in zip(d_steep_rows, rows, strict=True))
                 - sum(d * y for d, y in zip(d_steep_columns, columns, strict=True)))
    return ([d + s for d, s in zip(d_rows, d_steep_rows, strict=True)],
            [d + s for d, s in zip(d_columns, d_steep_columns, strict=True)], d_to_here)
