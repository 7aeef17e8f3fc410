"""Packed-sequence bookkeeping shared by the chunked kernel families.

A row of `segment_ids [B, T]` (int, 0 = padding) holds several segments; a segment is a maximal
run of one nonzero id, padding in between ignored. Recurrent state never crosses a segment start.
The chunked paths encode this as *reset groups*: `groups[b, t]` counts the segment starts after
the row's first segment up to and including t, so tokens i and j may interact iff their groups
are equal, and a row's `initial_state` reaches exactly the tokens of group 0.
"""

import jax.numpy as jnp
from jax import lax


def reset_groups(segment_ids, batch: int, length: int):
    """(valid [B,T] bool, groups [B,T] int32) for `segment_ids [B,T]` or None (one segment per row)."""
    if segment_ids is None:
        return jnp.ones((batch, length), bool), jnp.zeros((batch, length), jnp.int32)
    valid = segment_ids != 0
    position = jnp.arange(length, dtype=jnp.int32)
    # Index of the last real token strictly before t (-1 when none), via a running max.
    last_real = lax.cummax(jnp.where(valid, position, -1), axis=1)
    previous_real = jnp.pad(last_real[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    previous_id = jnp.take_along_axis(segment_ids, jnp.maximum(previous_real, 0), axis=1)
    starts = valid & (previous_real >= 0) & (segment_ids != previous_id)
    return valid, jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def chunk_relative_groups(groups, chunk: int):
    """groups [B, N*C] -> [B, N*C], each relative to the group of the state entering its chunk.

    After this, group 0 inside a chunk means "same segment as the carried-in state", which is all
    a kernel needs to decide whether the carried state reaches a token.
    """
    batch, length = groups.shape
    by_chunk = groups.reshape(batch, length // chunk, chunk)
    incoming = jnp.pad(by_chunk[:, :-1, -1], ((0, 0), (1, 0)))
    return (by_chunk - incoming[:, :, None]).reshape(batch, length)
