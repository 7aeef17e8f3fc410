"""Packed-sequence bookkeeping shared by the chunked kernel families.

A row of `segment_ids [B, T]` (int, 0 = padding) holds several segments; a segment is a maximal
run of one nonzero id, padding in between ignored. Recurrent state never crosses a segment start.
The chunked paths encode this as *reset groups*: `groups[b, t]` counts the segment starts after
the row's first segment up to and including t, so tokens i and j may interact iff their groups
are equal, and a row's `initial_state` reaches exactly the tokens of group 0.
"""

import jax.numpy as jnp
from jax import lax


def last_real_tokens(valid):
    """valid [B, T] bool -> (last [B, T] int32: the index of the last real token at or before t,
    previous [B, T] int32: the last one strictly before t), -1 where there is none."""
    position = jnp.arange(valid.shape[1], dtype=jnp.int32)
    last = lax.cummax(jnp.where(valid, position, -1), axis=1)
    return last, jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)


def reset_groups(segment_ids, batch: int, length: int):
    """(valid [B,T] bool, groups [B,T] int32) for `segment_ids [B,T]` or None (one segment per row)."""
    if segment_ids is None:
        return jnp.ones((batch, length), bool), jnp.zeros((batch, length), jnp.int32)
    valid = segment_ids != 0
    _, previous_real = last_real_tokens(valid)
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


def segment_starts(relative_groups, chunk: int):
    """Chunk-relative reset groups [B, N*C] (`chunk_relative_groups`) -> [B, N*C] bool: the tokens
    where a segment starts after the row's first, where a token-by-token scan resets its state."""
    batch, length = relative_groups.shape
    by_chunk = relative_groups.reshape(batch, length // chunk, chunk)
    return (jnp.diff(by_chunk, axis=-1, prepend=0) > 0).reshape(batch, length)


def zero_padded(x, valid, padded_length: int, dtype=None):
    """[B,T,...] -> [B,padded_length,...] in `dtype` (default x's): padding tokens (valid False) and
    the appended tail are zero, so they neither read nor change a state."""
    x = jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, padded_length - x.shape[1])
    return jnp.pad(x.astype(dtype or x.dtype), pad)


def padded_groups(groups, padded_length: int, chunk: int):
    """Reset groups [B,T] extended to [B,padded_length] (the tail joins the last segment) and made
    relative to each chunk's incoming state, [B,padded_length,1] int32."""
    groups = jnp.pad(groups, ((0, 0), (0, padded_length - groups.shape[1])), mode="edge")
    return chunk_relative_groups(groups, chunk)[:, :, None]


def initial_state_or_zeros(initial_state, batch: int, heads: int, key_dim: int, value_dim: int):
    """The state before each row's first segment, float32 [B,H,K,V]: zeros when none is given."""
    if initial_state is None:
        return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    return initial_state.astype(jnp.float32)


def scan_packed_rows(recurrence, initial_state, tokens, segment_ids):
    """The token-by-token semantics of packed rows, for the reference implementations.

    Runs `recurrence(state, token) -> (out, state)` along time: the state resets to zero where a
    segment starts (a nonzero id differing from the row's previous nonzero id), and a padding token
    (id 0) outputs zeros and leaves the state as it is. Written without the reset-group encoding, so
    that tests compare two derivations of the same rules.

    initial_state [B,...]; tokens: a tuple of time-major [T,B,...] arrays; segment_ids [B,T] or None.
    Returns (outputs [T,B,...], final state [B,...]).
    """
    length, batch = tokens[0].shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)

    def per_row(flag, x):
        return flag.reshape(flag.shape + (1,) * (x.ndim - 1))

    def step(carry, token):
        state, previous_id, seen = carry
        *inputs, id_t = token
        real = id_t != 0
        starts = real & seen & (id_t != previous_id)
        state = jnp.where(per_row(starts, state), 0.0, state)
        out, advanced = recurrence(state, tuple(inputs))
        state = jnp.where(per_row(real, state), advanced, state)
        out = jnp.where(per_row(real, out), out, 0.0)
        return (state, jnp.where(real, id_t, previous_id), seen | real), out

    carry = (initial_state, jnp.zeros((batch,), segment_ids.dtype), jnp.zeros((batch,), bool))
    (final_state, _, _), outputs = lax.scan(step, carry, (*tokens, jnp.swapaxes(segment_ids, 0, 1)))
    return outputs, final_state
