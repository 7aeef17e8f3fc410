"""The decode cache of a linear (recurrent) mixer: a constant-size state, whatever the context."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class RecurrentCache:
    """state [B, H, K, V] float32 (the recurrence after the tokens seen so far); conv_tails: the
    last inputs of each short convolution, a tuple of [B, width-1, C] (empty without convolutions);
    lengths [B] int32 (tokens seen per row). Nothing here grows with the number of tokens."""

    state: jax.Array
    conv_tails: tuple[jax.Array, ...]
    lengths: jax.Array


def run_recurrence(chunked, step, tokens: dict, state, segment_ids):
    """A linear mixer's recurrence over new tokens, by the path that suits the call.

    chunked: a chunked op (`chunk_gla`, `chunk_delta_rule`) taking `tokens` as keywords;
    step: its decode step (`gla_step`, `delta_step`); tokens: keyword arrays [B, T, ...] (q, k,
    v, gates, ...; None passes through); state [B, H, K, V] float32, or None when there is no
    cache (training, scoring). Without a state: one chunked call. With one: one decode step for a
    single unpadded token, otherwise a chunked call from the state (prefill).
    Returns (o [B, T, H, V], the new state or None).
    """
    if state is None:
        return chunked(**tokens, segment_ids=segment_ids), None
    if segment_ids is None and tokens["q"].shape[1] == 1:
        out, state = step(**{name: None if x is None else x[:, 0] for name, x in tokens.items()}, state=state)
        return out[:, None], state
    return chunked(**tokens, segment_ids=segment_ids, initial_state=state, output_final_state=True)
