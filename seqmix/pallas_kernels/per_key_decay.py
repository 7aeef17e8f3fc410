"""Products of two chunk-major arrays under a per-key decay, and their cotangents, for the `xla`
paths whose intra-chunk matrices carry a decay per key (the delta rule's KDA form).

    P_ij = sum_d x_id k_jd exp(G_id - G_jd)    for j < i in one segment (and x_i.k_i on the
                                               diagonal when asked), 0 elsewhere

x, k [N,B,H,C,K] (any float dtype, computed in float32); G = to_here [N,B,H,C,K] float32, the
inclusive prefix sums of the log decays inside each chunk (`chunked.gates`); earlier
[N,B,1,C,C] bool (`chunked.SegmentMasks.earlier`). P [N,B,H,C,C] float32.

Two forms, chosen per block of chunks by `lax.cond` as the GLA path chooses its own:
- factored: exp(G_i - G_j) = exp(G_i) exp(-G_j) folded into x and k, one masked matmul per
  chunk; exact while no chunk decays by more than `chunked.FACTORED_SPAN_LIMIT` nats (exp(-G) would
  overflow float32 past ~88). Its cotangents are written out: with x~ = x exp(G), k^ = k exp(-G)
  and dP masked like P, dx = exp(G) (dP k^), dk = exp(-G) (dP^T x~), dG = x~ (dP k^) - k^ (dP^T x~).
- exact, for any decay: queries of each 16-token sub-block I read the earlier sub-blocks' keys
  factored around R_I, the gate at the last token before I, so both exp(G_i - R_I) and
  exp(R_I - G_j) are <= 1; a sub-block's own pairs take exp(G_i - G_j) elementwise, masked before
  the exp. One chunk at a time (`lax.map`: its [c, c, K] blocks are 16x the chunk's keys), its
  cotangents by `jax.vjp` of the chunk's function.
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


def _factors(x, k, to_here):
    return x.astype(jnp.float32) * jnp.exp(to_here), k.astype(jnp.float32) * jnp.exp(-to_here)


def _factored(x, k, to_here, earlier, diagonal):
    x_decayed, k_grown = _factors(x, k, to_here)
    return _with_diagonal(jnp.where(earlier, chunked.mm_nt(x_decayed, k_grown), 0.0), x, k, diagonal)


def _factored_backward(x, k, to_here, earlier, d_products, diagonal):
    x_decayed, k_grown = _factors(x, k, to_here)
    d_off = jnp.where(earlier, d_products, 0.0)
    dx_decayed = chunked.mm(d_off, k_grown)
    dk_grown = chunked.mm_tn(d_off, x_decayed)
    dx, dk = dx_decayed * jnp.exp(to_here), dk_grown * jnp.exp(-to_here)
    if diagonal:
        d_self = jnp.diagonal(d_products, axis1=-2, axis2=-1)[..., None]
        dx, dk = dx + d_self * k.astype(jnp.float32), dk + d_self * x.astype(jnp.float32)
    return dx, dk, dx_decayed * x_decayed - dk_grown * k_grown


def _exact_chunk(x, k, to_here, earlier, diagonal):
    """One chunk's P, [B,H,C,C], from x, k, to_here [B,H,C,K] and earlier [B,1,C,C]; any decay."""
    chunk, key_dim = x.shape[-2:]
    size = min(SUB_BLOCK, chunk)
    blocks = chunk // size
    x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)

    def by_block(a):  # [..., C, D] -> [..., C/c, c, D]
        return a.reshape(a.shape[:-2] + (blocks, size, a.shape[-1]))

    gate = by_block(to_here)
    block_ends = gate[..., -1, :]
    reference = jnp.concatenate([jnp.zeros_like(block_ends[..., :1, :]), block_ends[..., :-1, :]], axis=-2)
    x_decayed = by_block(x32) * jnp.exp(gate - reference[..., None, :])
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // size
    before = key_block < lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)  # key j before sub-block I
    k_decayed = k32[..., None, :, :] * jnp.exp(
        jnp.where(before, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf))
    earlier_blocks = chunked.mm_nt(x_decayed, k_decayed).reshape(x.shape[:-2] + (chunk, chunk))

    within = (lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1))
    exponent = jnp.where(within[..., None], gate[..., :, None, :] - gate[..., None, :, :], -jnp.inf)
    own = jnp.sum(by_block(x32)[..., :, None, :] * by_block(k32)[..., None, :, :] * jnp.exp(exponent), axis=-1)
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
    """Whether no chunk of the block decays by more than the factored form's limit (G is
    non-increasing along a chunk, so its minimum is the strongest chunk total)."""
    return jnp.min(to_here) >= -chunked.FACTORED_SPAN_LIMIT


def products(x, k, to_here, earlier, *, diagonal: bool):
    """P [N,B,H,C,C] float32 (see the module docstring); diagonal: x_i.k_i on it, else 0."""
    return lax.cond(_factored_is_exact(to_here), lambda *a: _factored(*a, diagonal),
                    lambda *a: _exact(*a, diagonal), x, k, to_here, earlier)


def products_backward(x, k, to_here, earlier, d_products, *, diagonal: bool):
    """(dx, dk, d_to_here), each [N,B,H,C,K] float32, of `products` given d_products [N,B,H,C,C]."""
    return lax.cond(_factored_is_exact(to_here), lambda *a: _factored_backward(*a, diagonal),
                    lambda *a: _exact_backward(*a, diagonal), x, k, to_here, earlier, d_products)
