"""Inputs of the chunked paths, laid out once: masked, scaled, padded to whole chunks.

Shared by the kernel families: besides q, k, v, a family has float32 per-token inputs (`per_token`:
GLA's log gate; the delta rule's beta and log decay), laid out alike.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.grouped_heads import group_size
from seqmix.pallas_kernels.segments import initial_state_or_zeros, padded_groups, reset_groups, zero_padded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkedInputs:
    """q, k [B,Tp,Hk,K] (q scaled); v [B,Tp,H,V], H = G * Hk (`grouped_heads`); per_token: the
    family's per-token inputs, a tuple of float32 [B,Tp,H,W] (W = 1 for one value per head and token);
    groups [B,Tp,1] int32 relative to each chunk's incoming state (see `segments`). Tp: T padded to
    whole chunks. Padding tokens have zero q, k, v and per-token inputs, so they neither read nor
    change the state.
    Time-major as given; `head_major` makes the kernels' [B,H,Tp,D] of it."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    per_token: tuple[jax.Array, ...]
    groups: jax.Array


def matmul_dtype(dtype) -> jnp.dtype:
    """bfloat16 inputs feed bfloat16 matmuls (float32 accumulation); anything else runs in float32."""
    return jnp.dtype(jnp.bfloat16) if dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)


def to_chunks(q, k, v, per_token, scale, segment_ids, chunk: int, padded_length: int | None = None) -> ChunkedInputs:
    """per_token: a tuple of [B,T,H,W] or [B,T,H] arrays (the latter get W = 1).
    padded_length: a multiple of `chunk`, at least T (default: T rounded up to the chunk)."""
    batch, length = q.shape[:2]
    padded_length = length + (-length % chunk) if padded_length is None else padded_length
    valid, groups = reset_groups(segment_ids, batch, length)
    as_columns = lambda x: x if x.ndim == 4 else x[..., None]
    return ChunkedInputs(
        q=zero_padded(q.astype(jnp.float32) * scale, valid, padded_length, q.dtype),
        k=zero_padded(k, valid, padded_length),
        v=zero_padded(v, valid, padded_length),
        per_token=tuple(zero_padded(as_columns(x), valid, padded_length, jnp.float32) for x in per_token),
        groups=padded_groups(groups, padded_length, chunk),
    )


def head_major(x: ChunkedInputs) -> ChunkedInputs:
    """[B,Tp,H,D] -> [B,H,Tp,D]: a (batch, head) pair's chunk becomes a contiguous [C, D] tile, the
    block a Pallas kernel walks; on TPU it also puts (time, feature) in the two tiled dimensions.
    q and k keep their Hk heads (`tile_head`)."""
    swap = lambda a: jnp.swapaxes(a, 1, 2)
    return ChunkedInputs(q=swap(x.q), k=swap(x.k), v=swap(x.v), per_token=tuple(map(swap, x.per_token)),
                         groups=x.groups)


def tile_head(head, tile_heads: int, heads: int):
    """The head of a head-major tile [B,Hk,Tp,D] (Hk = tile_heads) that value head `head` (of
    `heads`) reads: itself when the tile has every head, else head // G, G = heads / Hk (q and k under
    grouped value heads, `grouped_heads`). For the kernels' BlockSpec index maps, so that no repeated
    copy is materialised."""
    groups = group_size(tile_heads, heads)
    # lax.div (truncating, exact for head >= 0) rather than //, whose sign fix-ups Mosaic lowers by
    # asking which TPU it targets.
    return head if groups == 1 else lax.div(head, groups)


def gradient_per_value_head(tile, heads: int, slices: int | None = None) -> jax.ShapeDtypeStruct:
    """What a backward kernel writes for a tile: its gradient per value head, [B,H,Tp,D], or, with
    `slices`, per value head and slice of value columns, [B,H,slices,Tp,D] (the GPU kernels split
    wide heads across programs, `sweep_gpu`); float32 where `shared_head_gradient` sums several of
    them (value heads sharing the tile's head, or slices), else the tile's dtype."""
    per_slice = () if slices is None else (slices,)
    summed = tile.shape[1] != heads or (slices or 1) > 1
    return jax.ShapeDtypeStruct((tile.shape[0], heads, *per_slice, *tile.shape[2:]),
                                jnp.float32 if summed else tile.dtype)


def shared_head_gradient(gradient, tile):
    """A backward kernel's gradient (`gradient_per_value_head`) -> the tile's [B,Hk,Tp,D] in its dtype:
    the slices summed, and each shared head's G consecutive value heads (the kernels keep one program
    or grid row per value head and slice, none of which may write another's; the reductions are XLA
    sums)."""
    if gradient.ndim == 5:
        gradient = gradient.sum(axis=2)
    batch, heads, padded, width = gradient.shape
    tile_heads = tile.shape[1]
    if tile_heads != heads:
        gradient = gradient.reshape(batch, tile_heads, heads // tile_heads, padded, width).sum(axis=2)
    return gradient.astype(tile.dtype)


def from_chunks(out, length: int, dtype):
    """[B,Tp,H,V] float32 -> [B,T,H,V] in the inputs' dtype."""
    return out[:, :length].astype(dtype)


def state_in(initial_state, batch: int, heads: int, key_dim: int, value_dim: int):
    """Public [B,H,K,V] (or None) -> the kernels' value-major float32 [B,H,V,K]."""
    return jnp.swapaxes(initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim), 2, 3)


def state_out(state):
    """Value-major [B,H,V,K] -> public [B,H,K,V]."""
    return jnp.swapaxes(state, 2, 3)
