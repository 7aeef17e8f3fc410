"""Autoregressive generation: a prefill of the prompts, in pieces of `PREFILL_CHUNK` tokens when
they are longer, then cached one-token decode steps."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# The longest prompt prefilled in one call; a longer one goes through the model in pieces of this
# many tokens (one compiled step, scanned), so that prefill holds one piece's activations, vocabulary
# logits and attention logits against the cache: [B, PREFILL_CHUNK, S] per head instead of [B, P, S].
PREFILL_CHUNK = 1024


class CacheTooLarge(ValueError):
    """The decode caches of a generation would not fit in the device's free memory."""


def cache_length(model: nnx.Module, batch: int, prompt_len: int, max_new_tokens: int, dtype) -> int:
    """The length of the caches `generate` allocates for `batch` prompts padded to `prompt_len`
    tokens and `max_new_tokens` new ones: `compiled_length` of their sum. Refuses (CacheTooLarge)
    a generation whose caches, `model.init_cache(batch, length, dtype)`, would not fit in the free
    memory of the first device (the host's available memory on CPU), estimated from their shapes
    before anything is allocated."""
    length = compiled_length(prompt_len + max_new_tokens)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length, dtype))
    needed = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(shapes))
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > free:
        raise CacheTooLarge(f"the decode caches of {batch} row(s) of {length} tokens (a prompt padded to {prompt_len} "
                            f"tokens and {max_new_tokens} new tokens, rounded up to a compiled length) need "
                            f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device.platform}")
    return length


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Picks a token per row from logits [B, V]: greedy when temperature == 0, otherwise a sample
    from softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches top_p (nucleus sampling). Returns [B] int32."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p (the top token always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def compiled_length(length: int) -> int:
    """How many tokens `generate` makes of `length`, for the width of a batch of prompts whose
    longest has `length` tokens and for the length of a cache: at least 16, and rounded up in four
    steps per doubling (to a multiple of 2^(ceil(log2 length) - 2), adding at most a quarter), so
    that calls with nearby lengths share one compiled prefill and decode step."""
    step = 1 << max((length - 1).bit_length() - 2, 0)
    return max(16, -(-length // step) * step)


def left_pad(prompts) -> tuple[jax.Array, jax.Array]:
    """Prompts of different lengths (a sequence of 1-D int sequences, or [B, P] when they share
    one length) -> (tokens [B, W] int32, segment_ids [B, W] int32), W = `compiled_length` of the
    longest (beyond `PREFILL_CHUNK`, a multiple of it), each prompt aligned to the right and
    preceded by padding (segment 0), so that every row's next token comes at the same index."""
    rows = [np.asarray(prompt, np.int32).reshape(-1) for prompt in prompts]
    if not rows or min(len(row) for row in rows) == 0:
        raise ValueError(f"generate needs at least one prompt, each of >= 1 token; got lengths {[len(r) for r in rows]}")
    width = compiled_length(max(len(row) for row in rows))
    if width > PREFILL_CHUNK:
        width = -(-width // PREFILL_CHUNK) * PREFILL_CHUNK
    tokens = np.zeros((len(rows), width), np.int32)
    segment_ids = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):] = row
        segment_ids[b, width - len(row):] = 1
    return jnp.asarray(tokens), jnp.asarray(segment_ids)


def prompt_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, P] int32 of `left_pad`'s rows, counted from each prompt's first token (0 on
    the padding), so that a padded row is positioned as it would be alone."""
    return jnp.maximum(jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - jnp.sum(segment_ids == 0, axis=1,
                                                                               keepdims=True, dtype=jnp.int32), 0)


def generate(model: nnx.Module, prompts, max_new_tokens: int, *, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, cache_dtype=jnp.float32) -> jax.Array:
    """Continues each prompt by max_new_tokens tokens; returns them, [B, max_new_tokens] int32.

    prompts: a sequence of 1-D token sequences, of different lengths if need be (they are
    left-padded, see `left_pad`; padding changes no row's result), or an int array [B, P].
    The padded prompts and the cache take `compiled_length`s, so that a call compiles its prefill
    and decode step only for shapes no earlier call had (an evaluation's batches of prompts sorted
    by length compiled both anew for every batch).
    Caches that would not fit in memory are refused before anything is allocated (CacheTooLarge).
    """
    tokens, segment_ids = left_pad(prompts)
    graphdef, state = nnx.split(model)
    batch, prompt_len = tokens.shape
    max_len = cache_length(model, batch, prompt_len, max_new_tokens, cache_dtype)
    padding = jnp.sum(segment_ids == 0, axis=1, dtype=jnp.int32)

    logits, cache = _prefill(graphdef, state, tokens, segment_ids, max_len, cache_dtype, PREFILL_CHUNK)
    new_tokens = []
    for key in jax.random.split(rng, max_new_tokens):
        token = sample_token(logits, key, temperature, top_p)
        new_tokens.append(token)
        if len(new_tokens) < max_new_tokens:
            logits, cache = _decode(graphdef, state, token, cache, padding)
    return jnp.stack(new_tokens, axis=1) if new_tokens else jnp.zeros((batch, 0), jnp.int32)


# At module level, so that the programs are compiled once per model structure and shapes, not once
# per call: the evaluations call `generate` once per batch of prompts, trial or request.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "cache_dtype", "chunk"))
def _prefill(graphdef, state, tokens, segment_ids, max_len: int, cache_dtype, chunk: int):
    """(logits [B, vocab] at each row's last prompt token, the cache after the prompt): the prompt
    in pieces of `chunk` tokens (one piece when it is no longer; P a multiple of it otherwise,
    `left_pad`), the cache carried from piece to piece."""
    cache = nnx.merge(graphdef, state).init_cache(tokens.shape[0], max_len, cache_dtype)
    size = min(chunk, tokens.shape[1])

    def piece(cache, inputs):
        tokens, segment_ids, positions = inputs
        logits, cache = nnx.merge(graphdef, state).extend(tokens, cache, segment_ids, positions)
        return cache, logits[:, -1]

    in_pieces = lambda a: jnp.moveaxis(a.reshape(a.shape[0], -1, size), 1, 0)  # [P / size, B, size]
    pieces = tuple(map(in_pieces, (tokens, segment_ids, prompt_positions(segment_ids))))
    cache, last_logits = jax.lax.scan(piece, cache, pieces)
    return last_logits[-1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, token, cache, padding):
    """One step: token [B] in, (logits [B, vocab], cache) out; padding [B] is each row's number of
    left-padding tokens, which its positions skip."""
    positions = cache[0].lengths[:, None] - padding[:, None]
    logits, cache = nnx.merge(graphdef, state).extend(token[:, None], cache, positions=positions)
    return logits[:, -1], cache
