"""What the long-convolution mixers (`s4d`, `spectral_ssm`) share: packed rows compacted so that
padding takes no time slot, and the last real tokens of a row, which their decode caches keep.

A convolution is positional (`causal_conv`: padding inside a segment takes its slot), while a
recurrent state is left alone by padding (the kernels' contract). The mixers compact each row
first, its real tokens in order then its padding, so that the convolution and the decode state
agree whatever the padding: a left-padded prompt, or padding between tokens of one segment.
"""

import jax.numpy as jnp


def take_rows(a, index):
    """a [B, T, ...] gathered along time at index [B, T'] -> [B, T', ...]."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def compaction(segment_ids):
    """segment_ids [B, T] int (0 = padding) -> (order [B, T]: each row's real tokens in their order
    then its padding; restore [B, T]: the inverse permutation; count [B] int32: real tokens per row).
    `take_rows(a, order)` compacts a row, `take_rows(a_compact, restore)` puts it back."""
    order = jnp.argsort(segment_ids == 0, axis=1, stable=True)
    return order, jnp.argsort(order, axis=1), jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)


def last_tokens(a, count, width: int):
    """a [B, T, ...], count [B] int -> [B, width, ...]: a[b, count[b] - width : count[b]], zeros
    where that index is negative (fewer than `width` tokens before)."""
    index = count[:, None] - width + jnp.arange(width)
    picked = take_rows(a, jnp.clip(index, 0, a.shape[1] - 1))
    return jnp.where((index >= 0).reshape(index.shape + (1,) * (a.ndim - 2)), picked, jnp.zeros((), a.dtype))
