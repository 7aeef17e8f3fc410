"""Products of chunk-major arrays under a per-key decay, and their cotangents, for the `xla` paths
whose intra-chunk matrices carry a decay per key (the delta rule's KDA form, DPLR).

    P(x, y)_ij = sum_d x_id y_jd exp(G_id - G_jd)    for j < i in one segment,
    P(x, y)_ii = x_i.y_i,                             0 elsewhere

for several row operands x and column operands y under one gate (the delta rule's k k^T and q k^T;
DPLR's four): x, y [N,B,H,C,K] (any float dtype, computed in float32); G = to_here [N,B,H,C,K]
float32, the inclusive prefix sums of the log decays inside each chunk (`chunked.gates`); earlier
[N,B,1,C,C] bool (`chunked.SegmentMasks.earlier`). P [N,B,H,C,C] float32. C is even; the `xla`
paths walk chunks of 32 tokens.

The chunk is cut into two halves and factored around R, the gate at the last token of the first
half: exp(G_i - G_j) = exp(G_i - R) exp(R - G_j), folded into x and y, then one matmul for every
pair of every operand. For a query in the second half and a key in the first both factors are <= 1;
inside a half one of them is <= 1 and the other at most exp(the half's own decay) (the first half's
counted from the chunk start), exact while that stays within `chunked.FACTORED_SPAN_LIMIT` nats
(3.75 nats per token over 16 tokens; Kimi's gates, up to ~1.6 per token at initialisation, stay far
inside). A key channel whose half decays by more ("steep") has its factor zeroed on that half (the
rows of the first half, the columns of the second), which removes exactly the pairs inside it from
the matmul; they are added elementwise, exp(G_i - G_j) on a masked [G, C/2, C/2] block (masked
before the exp) for each group of G = STEEP_GROUP steep channels of a half, in a loop that runs as
many times as the block's steepest half needs (none where no channel is steep). Every
exponential is <= 1 or bounded by e^60, so any decay, -8 nats per token included, is exact.
Factoring around the chunk start instead would overflow past 60 nats per chunk. Cutting a longer
chunk into more pieces, each with its own reference, needs one copy of the keys per piece
([C/c, C, K]); on this path's 2-core CPU their elementwise passes cost more than the longer chunk
saved (the delta rule's KDA form: 66 ms fwd+bwd at T = 4k in 32-token chunks of two halves, 74 ms
in 64-token chunks of four 16-token pieces).

Cotangents, written out: with x~ = x exp(G - R), y^ = y exp(R - G) and dP masked like P,
dx = exp(G - R) (dP y^), dy = exp(R - G) (dP^T x~), and, as every off-diagonal term is a product of
x_i exp(G_i) and y_j exp(-G_j), dG = x dx - y dy (R cancels out of P, so it takes no cotangent), the
elementwise pairs alike. The diagonal x_i.y_i stays out of the gates' graph: its exp(G_i - G_i) would
send +t and -t to G_i, whose rounding noise swamps the true gate gradient under strong decay.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.tile_math import eye

def _halves(a):
    """[..., C, D] -> [..., 2, C/2, D]."""
    return a.reshape(a.shape[:-2] + (2, a.shape[-2] // 2, a.shape[-1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Factors:
    """rows exp(G_i - R) and columns exp(R - G_j) [..., C, K], 0 on a steep half's side; steep
    [..., 2, K] bool: the channel decays by more than the limit inside that half."""

    rows: jax.Array
    columns: jax.Array
    steep: jax.Array


def _factors(to_here) -> _Factors:
    halves = _halves(to_here)
    reference = halves[..., 0, -1:, :]  # [..., 1, K]
    steep = jnp.stack([-reference[..., 0, :], reference[..., 0, :] - halves[..., 1, -1, :]],
                      axis=-2) > chunked.FACTORED_SPAN_LIMIT
    first_half = lax.broadcasted_iota(jnp.int32, (to_here.shape[-2], 1), 0) < to_here.shape[-2] // 2
    return _Factors(
        rows=jnp.exp(jnp.where(first_half & steep[..., :1, :], -jnp.inf, to_here - reference)),
        columns=jnp.exp(jnp.where(~first_half & steep[..., 1:, :], -jnp.inf, reference - to_here)),
        steep=steep,
    )


# Steep channels are taken elementwise this many at a time per half chunk, so that the pass costs
# what the most steep channels of any half in the block need rather than all K whenever one is
# steep. Trained gates have a few steep keys in most halves (a 600-step KDA model on held-out text:
# 0.4-2.9 of 32 keys per half on average, some in 42-94% of the halves); on its gates the delta
# rule's fwd+bwd takes 0.48-0.60x the time of one masked pass over all K channels. At T = 4k,
# K = V = 64 (see RESULTS): 0.5-0.6x with 5% of the keys steep, 0.8-0.9x with 30%, 1.1-1.9x with
# every key steep, where eight groups pay eight times the fixed cost of a pass. 16 channels a
# group: 0.60-0.67x with 5%, no better with all. A lax.cond choosing the single pass where the
# groups would be many made XLA run both 1.5-2x slower.
STEEP_GROUP = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SteepGroups:
    """rank [..., 2, K] int32: each half's steep channels numbered 0, 1, ... in key order, -1 for the
    others; groups: how many STEEP_GROUP-wide groups hold every steep channel of the block (int32)."""

    rank: jax.Array
    groups: jax.Array


def _steep_groups(steep) -> _SteepGroups:
    """From steep [..., 2, K] bool (`_Factors.steep`)."""
    counts = jnp.cumsum(steep, axis=-1, dtype=jnp.int32)
    return _SteepGroups(jnp.where(steep, counts - 1, -1), (jnp.max(counts[..., -1]) + STEEP_GROUP - 1) // STEEP_GROUP)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Group:
    """One group's channels of each half: channels [..., 2, G] int32, steep [..., 2, G] bool (False
    where the group runs past the half's steep channels), one_hot [..., 2, G, K] float32."""

    channels: jax.Array
    steep: jax.Array
    one_hot: jax.Array

    def gathered(self, a):
        """[..., C, K] -> the group's channels of each half, channel-major [..., 2, G, C/2] (the
        elementwise passes below then run over [C/2, C/2] tiles, not over G minor lanes)."""
        return jnp.swapaxes(jnp.take_along_axis(_halves(a), self.channels[..., None, :], axis=-1), -1, -2)

    def scattered(self, d):
        """[..., 2, G, C/2] -> [..., 2, C/2, K]: cotangents back onto all K channels."""
        return chunked.mm_tn(d, self.one_hot)


def _group(groups: _SteepGroups, index) -> _Group:
    """The index-th group: the steep channels ranked index * G to index * G + G - 1 in each half."""
    hit = groups.rank[..., None, :] == index * STEEP_GROUP + jnp.arange(STEEP_GROUP)[:, None]  # [..., 2, G, K]
    return _Group(jnp.argmax(hit, axis=-1), jnp.any(hit, axis=-1), hit.astype(jnp.float32))


def _steep_decays(group: _Group, to_here):
    """exp(G_i - G_j) [..., 2, G, C/2, C/2] on the group's channels for j < i inside one half, 0
    elsewhere and on channels that are not steep (masked before the exp: every exponential <= 1)."""
    gate = group.gathered(to_here)
    size = gate.shape[-1]
    within = lax.broadcasted_iota(jnp.int32, (size, size), 0) > lax.broadcasted_iota(jnp.int32, (size, size), 1)
    mask = within & group.steep[..., None, None]
    return jnp.exp(jnp.where(mask, gate[..., :, None] - gate[..., None, :], -jnp.inf))


def _steep_pairs(rows, columns, to_here, groups: _SteepGroups):
    """[[P(x, y) for y in columns] for x in rows] over the pairs inside each half on its steep
    channels only, [..., 2, C/2, C/2] each."""

    def add_group(index, sums):
        group = _group(groups, index)
        decays = _steep_decays(group, to_here)
        xs, ys = [group.gathered(x) for x in rows], [group.gathered(y) for y in columns]
        return [[s + jnp.sum(x[..., :, None] * y[..., None, :] * decays, axis=-3) for y, s in zip(ys, by_row)]
                for x, by_row in zip(xs, sums)]

    half = to_here.shape[-2] // 2
    zeros = jnp.zeros(to_here.shape[:-2] + (2, half, half), jnp.float32)
    return lax.fori_loop(0, groups.groups, add_group, [[zeros for _ in columns] for _ in rows])


def _steep_pairs_backward(rows, columns, to_here, groups: _SteepGroups, d_halves, d_rows, d_columns):
    """d_rows, d_columns [..., C, K] (the factored pass's) with the cotangents of `_steep_pairs` added,
    given its cotangents [[..., 2, C/2, C/2]]. The loop starts from them, so where no channel is
    steep they pass through untouched (no zeros, no additions)."""

    def add_group(index, grads):
        group = _group(groups, index)
        decays = _steep_decays(group, to_here)
        xs, ys = [group.gathered(x) for x in rows], [group.gathered(y) for y in columns]
        d_xs, d_ys = [0.0] * len(xs), [0.0] * len(ys)
        for r, x in enumerate(xs):
            for c, y in enumerate(ys):
                weighted = d_halves[r][c][..., None, :, :] * decays  # [..., 2, G, C/2, C/2]
                d_xs[r] = d_xs[r] + jnp.sum(weighted * y[..., None, :], axis=-1)
                d_ys[c] = d_ys[c] + jnp.sum(weighted * x[..., :, None], axis=-2)
        return tuple([total + group.scattered(d) for total, d in zip(totals, ds)]
                     for totals, ds in zip(grads, (d_xs, d_ys)))

    start = ([_halves(d) for d in d_rows], [_halves(d) for d in d_columns])
    d_xs, d_ys = lax.fori_loop(0, groups.groups, add_group, start)
    return [d.reshape(to_here.shape) for d in d_xs], [d.reshape(to_here.shape) for d in d_ys]


def _onto_diagonal_halves(halfwise):
    """[..., 2, C/2, C/2] -> [..., C, C] with the halves' blocks on the diagonal, 0 elsewhere."""
    zeros = jnp.zeros_like(halfwise[..., 0, :, :])
    return jnp.concatenate([jnp.concatenate([halfwise[..., 0, :, :], zeros], axis=-1),
                            jnp.concatenate([zeros, halfwise[..., 1, :, :]], axis=-1)], axis=-2)


def _diagonal_halves(square):
    """[..., C, C] -> its two diagonal blocks [..., 2, C/2, C/2]."""
    half = square.shape[-1] // 2
    return jnp.stack([square[..., :half, :half], square[..., half:, half:]], axis=-3)


def _stacked(operands, factor):
    """The operands times their factor, one after another along the chunk axis [..., n*C, K]."""
    return jnp.concatenate([x * factor for x in operands], axis=-2)


def _float32(operands):
    return [x.astype(jnp.float32) for x in operands]


def products(rows, columns, to_here, earlier):
    """[[P(x, y) for y in columns] for x in rows], each [N,B,H,C,C] float32 with x_i.y_i on its
    diagonal (see the module docstring); rows and columns: sequences of [N,B,H,C,K] arrays."""
    rows, columns = _float32(rows), _float32(columns)
    factors = _factors(to_here)
    chunk = to_here.shape[-2]
    stacked = chunked.mm_nt(_stacked(rows, factors.rows), _stacked(columns, factors.columns))
    factored = [[stacked[..., r * chunk:(r + 1) * chunk, c * chunk:(c + 1) * chunk] for c in range(len(columns))]
                for r in range(len(rows))]

    steep = [[_onto_diagonal_halves(s) for s in by_row]
             for by_row in _steep_pairs(rows, columns, to_here, _steep_groups(factors.steep))]
    diagonal = eye(chunk)
    return [[jnp.where(diagonal, jnp.sum(x * y, axis=-1, keepdims=True), jnp.where(earlier, p + s, 0.0))
             for y, p, s in zip(columns, by_row, steep_row, strict=True)]
            for x, by_row, steep_row in zip(rows, factored, steep, strict=True)]


def products_backward(rows, columns, to_here, earlier, d_products):
    """(d_rows, d_columns: lists of [N,B,H,C,K] float32, d_to_here [N,B,H,C,K]) of `products`, given
    d_products [[N,B,H,C,C]] nested like its result."""
    rows, columns = _float32(rows), _float32(columns)
    factors = _factors(to_here)
    chunk = to_here.shape[-2]
    d_off = [[jnp.where(earlier, d, 0.0) for d in by_row] for by_row in d_products]
    d_stacked = jnp.concatenate([jnp.concatenate(by_row, axis=-1) for by_row in d_off], axis=-2)
    d_decayed = chunked.mm(d_stacked, _stacked(columns, factors.columns))
    d_grown = chunked.mm_tn(d_stacked, _stacked(rows, factors.rows))
    d_x = [d_decayed[..., r * chunk:(r + 1) * chunk, :] * factors.rows for r in range(len(rows))]
    d_y = [d_grown[..., c * chunk:(c + 1) * chunk, :] * factors.columns for c in range(len(columns))]

    d_x, d_y = _steep_pairs_backward(rows, columns, to_here, _steep_groups(factors.steep),
                                     [[_diagonal_halves(d) for d in by_row] for by_row in d_off], d_x, d_y)
    d_to_here = sum(x * d for x, d in zip(rows, d_x, strict=True)) - sum(y * d for y, d in zip(columns, d_y, strict=True))
    for r, x in enumerate(rows):
        for c, y in enumerate(columns):
            d_self = jnp.diagonal(d_products[r][c], axis1=-2, axis2=-1)[..., None]
            d_x[r] = d_x[r] + d_self * y
            d_y[c] = d_y[c] + d_self * x
    return d_x, d_y, d_to_here
