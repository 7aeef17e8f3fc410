"""Products of two chunk-major arrays under a per-key decay, and their cotangents, for the `xla`
paths whose intra-chunk matrices carry a decay per key (the delta rule's KDA form, DPLR).

    P_ij = sum_d x_id k_jd exp(G_id - G_jd)    for j < i in one segment (and x_i.k_i on the
                                               diagonal when asked), 0 elsewhere

x, k [N,B,H,C,K] (any float dtype, computed in float32); G = to_here [N,B,H,C,K] float32, the
inclusive prefix sums of the log decays inside each chunk (`chunked.gates`); earlier
[N,B,1,C,C] bool (`chunked.SegmentMasks.earlier`). P [N,B,H,C,C] float32.

The chunk is cut into 16-token sub-blocks; R_I is the gate at the last token before sub-block I.
Two forms, chosen per block of chunks by `lax.cond`:
- factored: exp(G_i - G_j) = exp(G_i - R_I) exp(R_I - G_j) for the queries i of sub-block I, folded
  into x and into one copy of k per sub-block, then one matmul. The first factor is <= 1; the
  second is <= 1 for keys before I and at most exp(sub-block I's own decay) inside it, so the form
  is exact while no 16-token sub-block decays by more than `chunked.FACTORED_SPAN_LIMIT` nats
  (3.75 nats per token: Kimi's gates, up to ~1.6, stay far inside). Factoring around the chunk start
  instead would overflow past 60 nats per chunk, less than one per token. Its cotangents are
  written out: with x~ = x exp(G - R), k^ = k exp(R - G) and dP masked like P,
  dx = exp(G - R) (dP k^), dk = sum_I exp(R_I - G) (dP_I^T x~_I), dG = x~ (dP k^) - sum_I k^_I (dP_I^T x~_I)
  (R cancels out of P, so it takes no cotangent).
- exact, for any decay: the earlier sub-blocks' keys as above (every factor <= 1), a sub-block's
  own pairs with exp(G_i - G_j) elementwise, masked before the exp. One chunk at a time
  (`lax.map`: its [c, c, K] blocks are 16x the chunk's keys), its cotangents by `jax.vjp` of the
  chunk's function.
The diagonal x_i.k_i stays out of the gates' graph: its exp(G_i - G_i) would send +t and -t to G_i,
whose rounding noise swamps the true gate gradient under strong decay.
"""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked

SUB_BLOCK = 16


def _self_products(x, k):
    """x_i.k_i as a [..., C, 1] column."""
    return jnp.sum(x.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True)


def _with_diagonal(products, x, k, diagonal: bool):
    if not diagonal:
        return products
    return jnp.where(chunked.eye(products.shape[-1]), _self_products(x, k), products)


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


def _factored(x, k, to_here, earlier, diagonal):
    rows, columns = _factors(to_here)
    x_decayed = _by_block(x.astype(jnp.float32), rows.shape[-3]) * rows
    k_grown = k.astype(jnp.float32)[..., None, :, :] * columns
    products = chunked.mm_nt(x_decayed, k_grown).reshape(x.shape[:-1] + (x.shape[-2],))
    return _with_diagonal(jnp.where(earlier, products, 0.0), x, k, diagonal)


def _factored_backward(x, k, to_here, earlier, d_products, diagonal):
    """The references R_I cancel out of P, so they take no cotangent: G_i's comes through the rows,
    G_j's through the columns."""
    rows, columns = _factors(to_here)
    blocks = rows.shape[-3]
    x_decayed = _by_block(x.astype(jnp.float32), blocks) * rows
    k_grown = k.astype(jnp.float32)[..., None, :, :] * columns
    d_off = _by_block(jnp.where(earlier, d_products, 0.0), blocks)  # [..., C/c, c, C]
    dx_decayed = chunked.mm(d_off, k_grown)
    dk_grown = chunked.mm_tn(d_off, x_decayed)
    dx = (dx_decayed * rows).reshape(x.shape)
    dk = jnp.sum(dk_grown * columns, axis=-3)
    d_to_here = (dx_decayed * x_decayed).reshape(x.shape) - jnp.sum(dk_grown * k_grown, axis=-3)
    if diagonal:
        d_self = jnp.diagonal(d_products, axis1=-2, axis2=-1)[..., None]
        dx, dk = dx + d_self * k.astype(jnp.float32), dk + d_self * x.astype(jnp.float32)
    return dx, dk, d_to_here


def _exact_chunk(x, k, to_here, earlier, diagonal):
    """One chunk's P, [B,H,C,C], from x, k, to_here [B,H,C,K] and earlier [B,1,C,C]; any decay."""
    chunk = x.shape[-2]
    blocks = _sub_blocks(chunk)
    size = chunk // blocks
    x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)
    gate, reference = _by_block(to_here, blocks), _references(to_here, blocks)
    x_decayed = _by_block(x32, blocks) * jnp.exp(gate - reference[..., None, :])
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // size
    before = key_block < lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)  # key j before sub-block I
    k_decayed = k32[..., None, :, :] * jnp.exp(
        jnp.where(before, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf))
    earlier_blocks = chunked.mm_nt(x_decayed, k_decayed).reshape(x.shape[:-1] + (chunk,))

    within = lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1)
    exponent = jnp.where(within[..., None], gate[..., :, None, :] - gate[..., None, :, :], -jnp.inf)
    own = jnp.sum(_by_block(x32, blocks)[..., :, None, :] * _by_block(k32, blocks)[..., None, :, :]
                  * jnp.exp(exponent), axis=-1)
    block_eye = jnp.eye(blocks, dtype=jnp.float32)[:, None, :, None]  # own blocks onto P's diagonal blocks
    own = (own[..., :, :, None, :] * block_eye).reshape(earlier_blocks.shape)
    return _with_diagonal(jnp.where(earlier, earlier_blocks + own, 0.0), x, k, diagonal)


def _exact(x, k, to_here, earlier, diagonal):
    return lax.map(lambda chunk: _exact_chunk(*chunk, diagonal), (x, k, to_here, earlier))


def _exact_backward(x, k, to_here, earlier, d_products, diagonal):
    def chunk_backward(chunk):
        x, k, to_here, earlier, d_chunk = chunk
        _, pullback = jax.vjp(lambda *a: _exact_chunk(*a, earlier, diagonal), x.astype(jnp.float32),
                              k.astype(jnp.float32), to_here)
        return pullback(d_chunk)

    return lax.map(chunk_backward, (x, k, to_here, earlier, d_products))


def _factored_is_exact(to_here):
    """Whether no sub-block of the block's chunks decays by more than the factored form's limit."""
    blocks = _sub_blocks(to_here.shape[-2])
    decays = _references(to_here, blocks) - _by_block(to_here, blocks)[..., -1, :]
    return jnp.max(decays) <= chunked.FACTORED_SPAN_LIMIT


def products(x, k, to_here, earlier, *, diagonal: bool):
    """P [N,B,H,C,C] float32 (see the module docstring); diagonal: x_i.k_i on it, else 0."""
    return lax.cond(_factored_is_exact(to_here), lambda *a: _factored(*a, diagonal),
                    lambda *a: _exact(*a, diagonal), x, k, to_here, earlier)


def products_backward(x, k, to_here, earlier, d_products, *, diagonal: bool):
    """(dx, dk, d_to_here), each [N,B,H,C,K] float32, of `products` given d_products [N,B,H,C,C]."""
    return lax.cond(_factored_is_exact(to_here), lambda *a: _factored_backward(*a, diagonal),
                    lambda *a: _exact_backward(*a, diagonal), x, k, to_here, earlier, d_products)
