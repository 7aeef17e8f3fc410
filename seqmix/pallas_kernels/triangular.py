"""(I + L)^-1 for a strictly lower-triangular L: the chunk systems of the delta rule and of DPLR,
solved through their inverse by block doubling, in float32.

Block doubling: the 1x1 diagonal blocks of I + L are their own inverses (1); if X_A and X_B invert
the diagonal blocks of a 2b-block [[A, 0], [O, B]], its inverse is [[X_A, 0], [-X_B O X_A, X_B]].
ceil(log2 C) levels, exact algebra on exact inverses of smaller blocks. Never the Neumann series
sum_n (-L)^n: with entries of L up to 2 (the delta rule's beta near 2) its powers overflow float32.
Against LAPACK's trsm it also keeps the XLA path in XLA's own ops (threaded LAPACK is slow and
load-sensitive on CPU, see `delta.xla`).

One contract, two layouts of the same levels, chosen by the input's rank:
- a batch [..., C, C] (the XLA paths): each level multiplies the diagonal blocks' actual
  sub-blocks, [w, w] products (below w = 16 as elementwise products), C^3/3 multiply-adds in all;
- one [C, C] tile (a Pallas kernel body, `tile_math`): a kernel cannot slice or reshape a tile, so
  each level is two full-tile matmuls with the coupling block masked in, X <- X - X O X.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import tile_math
from seqmix.pallas_kernels.chunked import mm


def unit_lower_inverse(lower):
    """(I + L)^-1 [..., C, C] float32 of L = lower [..., C, C] float32, strictly lower-triangular:
    its diagonal and upper triangle are never read (taken as 0). A rank-2 `lower` is one kernel
    tile (`_tile_inverse`), a higher rank a batch on the XLA path (`_batched_inverse`); any C."""
    if lower.ndim == 2:
        return _tile_inverse(lower)
    return _batched_inverse(lower)


def _small_product(a, b):
    """[..., w, w] x [..., w, w] as an elementwise product and sum: batched dots of tiles this small
    run on XLA's generic CPU path, where the 4x4 level alone cost 10% of the delta rule's fwd+bwd."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _batched_inverse(lower):
    """Doubling on the diagonal blocks' own sub-blocks, kept as [..., blocks, w, w]. A C that is no
    power of two is padded with zero rows and columns, whose identity block leaves the leading
    block's inverse as it is."""
    size, batch = lower.shape[-1], lower.shape[:-2]
    padded = 1 << (size - 1).bit_length()
    if padded != size:
        lower = jnp.pad(lower, [(0, 0)] * len(batch) + [(0, padded - size)] * 2)
    inverse = jnp.ones(batch + (padded, 1, 1), lower.dtype)  # the 1x1 diagonal blocks, [.., blocks, w, w]
    width = 1
    while width < padded:
        blocks = padded // (2 * width)
        tiles = lower.reshape(batch + (blocks, 2, width, blocks, 2, width))
        # O of each diagonal 2w-block: block row 1, block column 0 of the block's own [2, w, 2, w] tiles.
        lower_left = jnp.moveaxis(jnp.diagonal(tiles[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2), -1, -3)
        upper, lower_right = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        product = _small_product if width <= 8 else mm
        corner = -product(lower_right, product(lower_left, upper))
        inverse = jnp.concatenate([jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1),
                                   jnp.concatenate([corner, lower_right], axis=-1)], axis=-2)
        width *= 2
    return inverse[..., 0, :size, :size]


def _tile_inverse(lower):
    """Doubling on whole [C, C] tiles: given X_b, the inverse of every aligned b-block on the
    diagonal, X_2b = X_b - X_b O_b X_b, where O_b keeps L's entries in the lower off-diagonal b-block
    of each 2b-block (block row 2m+1, block column 2m). A last, partial 2b-block works alike."""
    size = lower.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    inverse = tile_math.eye(size).astype(jnp.float32)
    level = 0
    while (1 << level) < size:
        row_block, col_block = rows >> level, cols >> level  # block indices at block size b = 2^level
        coupling = jnp.where((row_block == col_block + 1) & ((row_block & 1) == 1), lower, 0.0)
        inverse = inverse - tile_math.matmul(tile_math.matmul(inverse, coupling), inverse)
        level += 1
    return inverse
