"""LoLCATs attention: each query attends by softmax to its W most recent tokens and by Hedgehog
linear attention to every older token of its sequence, under one normaliser.

    q, k, v   = rope(x W_q), rope(x W_k), x W_v          (Llama's projections, grouped-query)
    s_tj      = q_t . k_j / sqrt(d),      c_t = max of s_tj over the window t - W < j <= t
    a_tj      = gamma_h exp(s_tj - c_t)   for t - W < j <= t          (the window: W tokens)
              = phi_q(q_t) . phi_k(k_j)    for j <= t - W              (every older token)
    o_t       = sum_j a_tj v_j / sum_j a_tj,        y = o W_o
    phi(x)    = [softmax(x W_h), softmax(-x W_h)]   (Hedgehog: W_h [d, d] per query head, init identity)
    gamma_h   = sigmoid(w_h)                        (the window factor per query head, init 0.1)

Source: Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models" (arXiv
2410.10254), eq. 6 with W = 64: the feature maps act on the rotated q and k, and c_t (the
window's largest logit) scales the window's terms only, as in the paper and its code, so the
learned gamma_h trades the two parts off against that. Every term is bounded (window terms by
gamma_h, linear ones by 2) and the normaliser is at least gamma_h for a real query: no overflow
whatever the logits, and no division by zero.

Training: the older tokens go through the chunked linear attention (`chunk_gla` without a gate,
the normaliser as an extra value column of ones) with keys and values delayed by W tokens:
recurrence step t carries token t - W (nothing when that token lies in another segment or is
padding), so its state at t holds exactly the tokens j <= t - W of t's segment, with no
subtraction and a clean reset at every segment start. The window is `Attention`'s mask.

Decoding carries a ring buffer of the last W rotated keys and values (as sliding-window
attention) and the state [H, 2d, d + 1] of the tokens older than that (its last column sums
phi_k), in a `WindowedRecurrentCache`; a token joins the state as it leaves the ring. Neither
grows with the context.

Parameters: q/k/v/o_proj of `Attention`'s shapes (a pretrained attention layer loads unchanged),
plus q_map, k_map and window_factor, which are `TransferParam`s: attention transfer trains them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.feature_maps import Hedgehog
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.layers.transfer import TransferParam
from seqmix.mixers.attention import Attention, AttentionConfig, KVCache, attention_mask, grouped_logits, ring_window
from seqmix.mixers.recurrent import RecurrentMixer, WindowedRecurrentCache
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

INITIAL_WINDOW_FACTOR = 0.1  # gamma_h at conversion, as LoLCATs initialises it


@dataclasses.dataclass
class LolcatsConfig:
    window: int = 64  # tokens each query sees by softmax (itself included)
    qkv_bias: bool = False  # as the attention layer it converts (Qwen2)

    def validate(self, path: str) -> None:
        require(self.window > 0, path, "window", f"must be positive, got {self.window}")


@register_mixer("lolcats", LolcatsConfig)
class LolcatsAttention(Attention, RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads query heads and n_kv_heads key/value heads of head_dim."""

    def __init__(self, model_config, config: LolcatsConfig, *, rngs: nnx.Rngs):
        super().__init__(model_config, AttentionConfig(sliding_window=config.window, qkv_bias=config.qkv_bias),
                         rngs=rngs)
        heads = model_config.n_heads
        self.init_state(heads, 2 * self.head_dim, self.head_dim + 1)
        self.q_map = Hedgehog(heads, self.head_dim, param_type=TransferParam)
        self.k_map = Hedgehog(heads, self.head_dim, param_type=TransferParam)
        initial = math.log(INITIAL_WINDOW_FACTOR / (1 - INITIAL_WINDOW_FACTOR))  # sigmoid's inverse
        self.window_factor = TransferParam(jnp.full((heads,), initial, jnp.float32), out_sharding=("heads",),
                                           eager_sharding=False)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: WindowedRecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions [B, T] int32 (default:
        0..T-1 in every row). Returns (y [B, T, D], cache).

        With a cache, the T new tokens follow each row's cached context (see `Attention`);
        segment_ids then only mark padding, which no token attends to.
        """
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        rotate = functools.partial(apply_rotary, positions=positions, theta=self.rope_theta, scaling=self.rope_scaling)
        q, k = rotate(self._heads(self.q_proj(x))), rotate(self._heads(self.k_proj(x)))
        v = self._heads(self.v_proj(x))
        if cache is None:
            window_terms = _window_in_blocks(q, k, v, segment_ids, self.window, self.head_dim ** -0.5)
            window_cache = None
            older_k, older_v, older_real = _delayed_tokens(k, v, segment_ids, self.window)
        else:
            real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
            keys, values, mask, window_cache = ring_window(k, v, real, cache.window, window=self.window)
            window_terms = _window(grouped_logits(q, keys, mask, self.head_dim ** -0.5), values)
            older_k, older_v, older_real = _leaving_ring(keys, values, real, cache.window)
        older, recurrent_cache = self._older_tokens(q, older_k, older_v, older_real, cache, segment_ids)
        out = self._combine(window_terms, older)
        if cache is not None:
            cache = WindowedRecurrentCache(recurrent=recurrent_cache, window=window_cache)
        return self.o_proj(out.astype(x.dtype).reshape(batch, length, -1)), cache

    def _older_tokens(self, q, older_k, older_v, older_real, cache, segment_ids):
        """The linear attention over the tokens older than the window: ([B, T, H, d + 1] float32,
        numerators then the normaliser sum_j phi_q(q_t) . phi_k(k_j); the updated recurrent cache).
        older_k/older_v [B, T, H_kv, d] hold token t - W at step t, older_real [B, T] whether it counts."""
        to_query_heads = lambda a: jnp.repeat(a, self.heads // a.shape[2], axis=2)
        counts = older_real[:, :, None, None].astype(jnp.float32)
        keys = self.k_map(to_query_heads(older_k)) * counts
        values = to_query_heads(older_v).astype(jnp.float32)
        values = jnp.concatenate([values, jnp.ones(values.shape[:-1] + (1,), jnp.float32)], axis=-1) * counts
        # With a cache every token of a row is one sequence, and `counts` already drop padding.
        return self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                          dict(q=self.q_map(q), k=keys, v=values), None if cache is None else cache.recurrent,
                          segment_ids if cache is None else None)

    def _combine(self, window_terms, older):
        """o [B, T, H, d] float32 from the window's terms (`_window`: numerators [B, H_kv, G, T, d]
        and sums [B, H_kv, G, T] of exp(s_tj - c_t)), each scaled by its head's gamma, and the older
        tokens' numerators and normaliser (`_older_tokens`)."""
        window_out, window_sum = window_terms
        batch, kv_heads, groups, length, dim = window_out.shape
        gamma = jax.nn.sigmoid(self.window_factor[...]).reshape(kv_heads, groups, 1)
        to_tokens = lambda a: jnp.moveaxis(gamma[..., None] * a, 3, 1).reshape(batch, length, kv_heads * groups, -1)
        return (to_tokens(window_out) + older[..., :-1]) / (to_tokens(window_sum[..., None]) + older[..., -1:])

    def init_cache(self, batch: int, max_len: int, dtype) -> WindowedRecurrentCache:
        """An empty cache: a zero state and W empty slots per row, whatever max_len."""
        return WindowedRecurrentCache(recurrent=RecurrentMixer.init_cache(self, batch, max_len, dtype),
                                      window=Attention.init_cache(self, batch, max_len, dtype))


def _window(logits, values):
    """The window's terms from logits [B, H_kv, G, T, S] (masked at the finite minimum) and values
    [B, S, H_kv, d]: (sum_j exp(s_tj - c_t) v_j [B, H_kv, G, T, d], sum_j exp(s_tj - c_t)
    [B, H_kv, G, T]) float32. A padding query sees no key: its logits are all the minimum, its
    weights 1."""
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return jnp.einsum("bkgts,bskd->bkgtd", weights, values.astype(jnp.float32)), jnp.sum(weights, axis=-1)


def _window_in_blocks(q, k, v, segment_ids, window: int, scale):
    """`_window` of a whole sequence under sliding-window attention's mask, in blocks of W queries
    against the 2W keys of their own block and the one before, which hold every key their windows
    reach: [T, 2W] logits instead of [T, T]. q [B, T, H, d], k/v [B, T, H_kv, d], segment_ids
    [B, T] or None; returns `_window`'s terms for the T queries."""
    batch, length, heads, dim = q.shape
    blocks = -(-length // window)
    segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
    # One block of padding (segment 0, which no query sees) before the first, to the end of the last.
    pad = lambda a, before: jnp.pad(a, [(0, 0), (before, blocks * window - length)] + [(0, 0)] * (a.ndim - 2))
    in_blocks = lambda a: a.reshape((batch, -1, window) + a.shape[2:])
    with_previous = lambda a: jnp.concatenate([in_blocks(a)[:, :-1], in_blocks(a)[:, 1:]], axis=2)  # [B, n, 2W, ...]
    keys, values, key_segments = (with_previous(pad(a, window)) for a in (k, v, segments))
    queries, query_segments = in_blocks(pad(q, 0)), in_blocks(pad(segments, 0))
    index = jnp.arange(blocks * window, dtype=jnp.int32).reshape(blocks, window)
    key_index = jnp.concatenate([index - window, index], axis=1)
    flat = lambda a: a.reshape((batch * blocks,) + a.shape[2:])  # one row per block
    mask = attention_mask(flat(jnp.broadcast_to(index, (batch, blocks, window))),
                          flat(jnp.broadcast_to(key_index, (batch, blocks, 2 * window))),
                          q_segment=flat(query_segments), k_segment=flat(key_segments), window=window)
    out, total = _window(grouped_logits(flat(queries), flat(keys), mask, scale), flat(values))
    rows = lambda a: jnp.moveaxis(a.reshape((batch, blocks) + a.shape[1:]), 1, 3)  # blocks beside tokens
    out, total = rows(out), rows(total)
    tokens = blocks * window
    return (out.reshape(out.shape[:3] + (tokens, dim))[..., :length, :],
            total.reshape(total.shape[:3] + (tokens,))[..., :length])


def _delayed_tokens(k, v, segment_ids, window: int):
    """(k, v) [B, T, H_kv, d] moved `window` tokens later (step t holds token t - W) and [B, T]
    bool: token t - W exists, is not padding and lies in t's segment."""
    batch, length = k.shape[:2]
    delay = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :window]), a], axis=1)[:, :length]
    segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
    return delay(k), delay(v), (delay(segments) == segments) & (segments != 0)


def _leaving_ring(keys, values, real, ring: KVCache):
    """`_delayed_tokens` for T new tokens after each row's cached context: token p - W for new
    position p, which is the ring slot (p - W) % W that p overwrites while p - W precedes the new
    tokens, and new token i - W after that. keys/values [B, W + T, H_kv, d] are `ring_window`'s
    (the ring's slots, then the new tokens); ring: the cache before the new tokens; real [B, T]."""
    slots, length = ring.k.shape[1], real.shape[1]
    step = jnp.arange(length, dtype=jnp.int32)
    index = jnp.where(step < slots, (ring.lengths[:, None] + step - slots) % slots, step)
    take = lambda a: jnp.take_along_axis(a, index.reshape(*index.shape, *(1,) * (a.ndim - 2)), axis=1)
    # An empty slot (p - W < 0, or a row's padding) is not valid, so it never joins the state.
    return take(keys), take(values), take(jnp.concatenate([ring.valid, real], axis=1))
