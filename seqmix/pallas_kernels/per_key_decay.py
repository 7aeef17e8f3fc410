"""Products of two chunk-major arrays under a per-key decay, and their cotangents, for the `xla`
paths whose intra-chunk matrices carry a decay per key (the delta rule's KDA form, DPLR).

    P(x, y)_ij = sum_d x_id y_jd exp(G_id - G_jd)    for j < i in one segment,
    P(x, y)_ii = x_i.y_i,                             0 elsewhere

for several row operands x and column operands y under one gate (the delta rule's k k^T and q k^T;
DPLR's four): x, y [N,B,H,C,K] (any float dtype, computed in float32); G = to_here [N,B,H,C,K]
float32, the inclusive prefix sums of the log decays inside each chunk (`chunked.gates`); earlier
[N,B,1,C,C] bool (`chunked.SegmentMasks.earlier`). P [N,B,H,C,C] float32.

The chunk is cut into 16-token sub-blocks; R_I is the gate at the last token before sub-block I.
Two forms, chosen per block of chunks by `lax.cond`:
- factored: exp(G_i - G_j) = exp(G_i - R_I) exp(R_I - G_j) for the queries i of sub-block I, folded
  into x and into one copy of y per sub-block, then one matmul. The first factor is <= 1; the
  second is <= 1 for keys before I and at most exp(sub-block I's own decay) inside it, so the form
  is exact while no 16-token sub-block decays by more than `chunked.FACTORED_SPAN_LIMIT` nats
  (3.75 nats per token: Kimi's gates, up to ~1.6, stay far inside). Factoring around the chunk start
  instead would overflow past 60 nats per chunk, less than one per token. Its cotangents are
  written out: with x~ = x exp(G - R), y^ = y exp(R - G) and dP masked like P,
  dx = exp(G - R) (dP y^), dy = sum_I exp(R_I - G) (dP_I^T x~_I), dG = x~ (dP y^) - sum_I y^_I (dP_I^T x~_I)
  (R cancels out of P, so it takes no cotangent). The factors are computed once for all operands.
- exact, for any decay: the earlier sub-blocks' keys as above (every factor <= 1), a sub-block's
  own pairs with exp(G_i - G_j) elementwise, masked before the exp. One chunk at a time
  (`lax.map`: its [c, c, K] blocks are 16x the chunk's keys), every (x, y) pair in one call
  (stacked along the heads), its cotangents by `jax.vjp` of the chunk's function.
The diagonal x_i.y_i stays out of the gates' graph: its exp(G_i - G_i) would send +t and -t to G_i,
whose rounding noise swamps the true gate gradient under strong decay.
"""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked

SUB_BLOCK = 16


def _self_products(x, y):
    """x_i.y_i as a [..., C, 1] column."""
    return jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32), axis=-1, keepdims=True)


def _masked(products, x, y, earlier):
    """P on `earlier`, x_i.y_i on the diagonal, 0 elsewhere."""
    return jnp.where(chunked.eye(products.shape[-1]), _self_products(x, y), jnp.where(earlier, products, 0.0))


def _by_block(a, blocks: int):
    """[..., C, D] -> [..., C/c, c, D]."""
    return a.reshape(a.shape[:-2] + (blocks, a.shape[-2] // blocks, a.shape[-1]))


def _references(to_here, blocks: int):
    """R_I [..., C/c, K], the gate at the last token before sub-block I (0 before the first)."""
    ends = _by_block(to_here, blocks)[..., -1, :]
    return jnp.concatenate([jnp.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], axis=-2)


def _sub_blocks(chunk: int) -> int:
    return chunk // min(SUB_BLOCK, chunk)


def _factors(to_here):
    """(rows exp(G_i - R_I) [..., C/c, c, K] for the queries of sub-block I, all <= 1; columns
    exp(R_I - G_j) [..., C/c, C, K] for the keys of sub-blocks up to I, 0 after it: <= 1 before I,
    at most exp(the sub-block's own decay) inside it)."""
    chunk = to_here.shape[-2]
    blocks = _sub_blocks(chunk)
    reference = _references(to_here, blocks)
    rows = jnp.exp(_by_block(to_here, blocks) - reference[..., None, :])
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // (chunk // blocks)
    reachable = key_block <= lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)
    columns = jnp.exp(jnp.where(reachable, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf))
    return rows, columns


def _factored_operands(rows, columns, to_here):
    """(x exp(G - R) [..., C/c, c, K] per row operand, y exp(R - G) [..., C/c, C, K] per column
    operand, and the two factors), the factors computed once for all operands."""
    row_factors, column_factors = _factors(to_here)
    blocks = row_factors.shape[-3]
    decayed = [_by_block(x.astype(jnp.float32), blocks) * row_factors for x in rows]
    grown = [y.astype(jnp.float32)[..., None, :, :] * column_factors for y in columns]
    return decayed, grown, row_factors, column_factors


def _factored(rows, columns, to_here, earlier):
    decayed, grown, _, _ = _factored_operands(rows, columns, to_here)
    square = lambda p: p.reshape(p.shape[:-3] + (-1, p.shape[-1]))  # [..., C/c, c, C] -> [..., C, C]
    return [[_masked(square(chunked.mm_nt(x_decayed, y_grown)), x, y, earlier)
             for y, y_grown in zip(columns, grown, strict=True)] for x, x_decayed in zip(rows, decayed, strict=True)]


def _factored_backward(rows, columns, to_here, earlier, d_products):
    """The references R_I cancel out of P, so they take no cotangent: G_i's comes through the rows,
    G_j's through the columns."""
    decayed, grown, row_factors, column_factors = _factored_operands(rows, columns, to_here)
    blocks = row_factors.shape[-3]
    d_rows = [jnp.zeros(x.shape, jnp.float32) for x in rows]
    d_columns = [jnp.zeros(y.shape, jnp.float32) for y in columns]
    d_decayed, d_grown = [0.0] * len(rows), [0.0] * len(columns)
    for r, (x, x_decayed) in enumerate(zip(rows, decayed, strict=True)):
        for c, (y, y_grown) in enumerate(zip(columns, grown, strict=True)):
            d_off = _by_block(jnp.where(earlier, d_products[r][c], 0.0), blocks)  # [..., C/c, c, C]
            d_self = jnp.diagonal(d_products[r][c], axis1=-2, axis2=-1)[..., None]
            d_decayed[r] = d_decayed[r] + chunked.mm(d_off, y_grown)
            d_grown[c] = d_grown[c] + chunked.mm_tn(d_off, x_decayed)
            d_rows[r] = d_rows[r] + d_self * y.astype(jnp.float32)
            d_columns[c] = d_columns[c] + d_self * x.astype(jnp.float32)
    d_to_here = sum((d * x_decayed).reshape(to_here.shape) for d, x_decayed in zip(d_decayed, decayed, strict=True))
    d_to_here = d_to_here - sum(jnp.sum(d * y_grown, axis=-3) for d, y_grown in zip(d_grown, grown, strict=True))
    d_rows = [d + (d_x * row_factors).reshape(d.shape) for d, d_x in zip(d_rows, d_decayed, strict=True)]
    d_columns = [d + jnp.sum(d_y * column_factors, axis=-3) for d, d_y in zip(d_columns, d_grown, strict=True)]
    return d_rows, d_columns, d_to_here


def _exact_chunk(x, y, to_here, earlier):
    """One chunk's P, [B,H,C,C], from x, y, to_here [B,H,C,K] and earlier [B,1,C,C]; any decay."""
    chunk = x.shape[-2]
    blocks = _sub_blocks(chunk)
    size = chunk // blocks
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    gate, reference = _by_block(to_here, blocks), _references(to_here, blocks)
    x_decayed = _by_block(x32, blocks) * jnp.exp(gate - reference[..., None, :])
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // size
    before = key_block < lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)  # key j before sub-block I
    y_decayed = y32[..., None, :, :] * jnp.exp(
        jnp.where(before, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf))
    earlier_blocks = chunked.mm_nt(x_decayed, y_decayed).reshape(x.shape[:-1] + (chunk,))

    within = lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1)
    exponent = jnp.where(within[..., None], gate[..., :, None, :] - gate[..., None, :, :], -jnp.inf)
    own = jnp.sum(_by_block(x32, blocks)[..., :, None, :] * _by_block(y32, blocks)[..., None, :, :]
                  * jnp.exp(exponent), axis=-1)
    block_eye = jnp.eye(blocks, dtype=jnp.float32)[:, None, :, None]  # own blocks onto P's diagonal blocks
    own = (own[..., :, :, None, :] * block_eye).reshape(earlier_blocks.shape)
    return _masked(earlier_blocks + own, x, y, earlier)


def _pairs(rows, columns, per_pair):
    """The (row, column) pairs' arrays stacked along the heads [N,B,P*H,...], so that one batched
    call serves every pair; per_pair(x, y) picks what to stack of a pair."""
    return jnp.concatenate([per_pair(x, y) for x in rows for y in columns], axis=2)


def _exact(rows, columns, to_here, earlier):
    pairs = len(rows) * len(columns)
    stacked = (_pairs(rows, columns, lambda x, y: x), _pairs(rows, columns, lambda x, y: y),
               jnp.concatenate([to_here] * pairs, axis=2))
    products = jnp.split(lax.map(lambda chunk: _exact_chunk(*chunk), (*stacked, earlier)), pairs, axis=2)
    return [products[r * len(columns):(r + 1) * len(columns)] for r in range(len(rows))]


def _exact_backward(rows, columns, to_here, earlier, d_products):
    pairs = len(rows) * len(columns)
    stacked = (_pairs(rows, columns, lambda x, y: x.astype(jnp.float32)),
               _pairs(rows, columns, lambda x, y: y.astype(jnp.float32)),
               jnp.concatenate([to_here] * pairs, axis=2))
    d_stacked = jnp.concatenate([d for by_row in d_products for d in by_row], axis=2)

    def chunk_backward(chunk):
        *inputs, earlier, d_chunk = chunk
        _, pullback = jax.vjp(lambda *a: _exact_chunk(*a, earlier), *inputs)
        return pullback(d_chunk)

    d_x, d_y, d_to_here = (jnp.split(d, pairs, axis=2) for d in lax.map(chunk_backward, (*stacked, earlier, d_stacked)))
    width = len(columns)
    return ([sum(d_x[r * width:(r + 1) * width]) for r in range(len(rows))],
            [sum(d_y[c::width]) for c in range(width)], sum(d_to_here))


def _factored_is_exact(to_here):
    """Whether no sub-block of the block's chunks decays by more than the factored form's limit."""
    blocks = _sub_blocks(to_here.shape[-2])
    decays = _references(to_here, blocks) - _by_block(to_here, blocks)[..., -1, :]
    return jnp.max(decays) <= chunked.FACTORED_SPAN_LIMIT


def products(rows, columns, to_here, earlier):
    """[[P(x, y) for y in columns] for x in rows], each [N,B,H,C,C] float32 with x_i.y_i on its
    diagonal (see the module docstring); rows and columns: sequences of [N,B,H,C,K] arrays."""
    return lax.cond(_factored_is_exact(to_here), _factored, _exact, list(rows), list(columns), to_here, earlier)


def products_backward(rows, columns, to_here, earlier, d_products):
    """(d_rows, d_columns: lists of [N,B,H,C,K] float32, d_to_here [N,B,H,C,K]) of `products`, given
    d_products [[N,B,H,C,C]] nested like its result."""
    return lax.cond(_factored_is_exact(to_here), _factored_backward, _exact_backward, list(rows), list(columns),
                    to_here, earlier, [list(by_row) for by_row in d_products])
