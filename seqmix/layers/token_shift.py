"""The token shift within packed segments: each token's predecessor, padding skipped as the
recurrence skips it, for RWKV-6's and RWKV-7's token-shift interpolation and Hydra's shifted
output. Shapes: x [B, T, ...]; segment_ids [B, T] (0 = padding) or None; the carried tail of a
decode cache [B, 1, D]."""

import jax.numpy as jnp

from seqmix.pallas_kernels.segments import last_real_tokens


def previous_tokens(segment_ids, batch: int, length: int):
    """Where each token's predecessor is, padding (segment 0) skipped as the recurrence skips it.

    segment_ids [B, T] or None. Returns (previous [B, T] int32: the index of the last real token
    before t in the row, -1 when none; same [B, T] bool: t is real and `previous` is in its
    segment; last [B, 1] int32: the row's last real token, -1 when none).
    """
    real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
    last_real, previous = last_real_tokens(real)
    same = real & (previous >= 0)
    if segment_ids is not None:
        same &= take(segment_ids, previous) == segment_ids
    return previous, same, last_real[:, -1:]


def take(x, index):
    """x [B, T, ...] at index [B, N] (clamped to >= 0) -> [B, N, ...]."""
    index = jnp.maximum(index, 0).reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def shift(x, previous, same):
    """x [B, T, ...] moved one token later within segments: x at `previous` where `same`, else 0."""
    return jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), take(x, previous), jnp.zeros((), x.dtype))


def token_shift(x, previous, same, last, tail=None):
    """The previous input of each token, and what the next call continues from.

    x [B, T, D]; previous, same, last from `previous_tokens`; tail [B, 1, D]: the last input of
    the previous call (a decode cache's), None without one (zeros). Returns (x_prev [B, T, D]: the
    previous token of the segment, the tail for the call's first real token, which continues the
    cached context, and 0 at later segment starts; the new tail [B, 1, D]: the row's last real
    input, the old tail when the call has none).
    """
    tail = jnp.zeros((x.shape[0], 1, x.shape[-1]), x.dtype) if tail is None else tail.astype(x.dtype)
    x_prev = jnp.where((previous < 0)[..., None], tail, shift(x, previous, same))
    return x_prev, jnp.where((last >= 0)[..., None], take(x, last), tail)
