"""Liger attention: a softmax attention layer's own projections drive a gated linear recurrence
and a sliding-window softmax attention, and the layer outputs their mean.

    q, k, v   = x W_q, x W_k, x W_v                       (Llama's projections, grouped-query)
    log g_t   = logsigmoid(k_t) / 16                      (per head and key dim: the key is the gate)
    S_t       = diag(exp(log g_t)) S_{t-1} + phi(k_t) v_t^T,    r_t = S_t^T phi(q_t)     (scale 1)
    w_t       = softmax attention of rope(q_t) over rope(k_j), v_j for the last W tokens j <= t
    y         = (0.5 r + 0.5 w) W_o,          phi = softmax over the head dim, W = 64

Source: Lan et al. 2025, "Liger: Linearizing Large Language Models to Gated Recurrent Structures"
(arXiv 2503.01496): the gate is pooled from the key projection (the identity here, as the widths
match), the feature maps are parameter-free and applied before RoPE, which only the window branch
uses. The recurrent branch repeats the key/value heads to the query heads (query head h reads kv
head h // (H / H_kv), as in `softmax_attention`). There are no parameters besides q_proj, k_proj,
v_proj and o_proj of `Attention`'s shapes, so a pretrained attention layer loads unchanged.

Decoding carries both branches: the recurrence's [K, V] state per head and a ring buffer of the
last W keys and values (`LigerCache`); neither grows with the context.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers import feature_maps
from seqmix.layers.rotary import apply_rotary
from seqmix.mixers.attention import Attention, AttentionConfig, KVCache
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

GATE_NORMALIZER = 16.0  # log g = logsigmoid(k) / 16 keeps decays near 1 from the start


@dataclasses.dataclass
class LigerAttentionConfig:
    window: int = 64  # tokens each query sees in the softmax branch (itself included)

    def validate(self, path: str) -> None:
        require(self.window > 0, path, "window", f"must be positive, got {self.window}")


@struct.dataclass
class LigerCache:
    """recurrent: the gated recurrence's state; window: a ring of the last W keys and values."""

    recurrent: RecurrentCache
    window: KVCache

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: tokens seen per row (both branches have seen the same)."""
        return self.window.lengths


@register_mixer("liger_attention", LigerAttentionConfig)
class LigerAttention(Attention, RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads query heads and n_kv_heads key/value heads of head_dim."""

    def __init__(self, model_config, config: LigerAttentionConfig, *, rngs: nnx.Rngs):
        super().__init__(model_config, AttentionConfig(sliding_window=config.window), rngs=rngs)
        self.init_state(model_config.n_heads, self.head_dim, self.head_dim)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: LigerCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions [B, T] int32 (default:
        0..T-1 in every row), for the window branch's RoPE. Returns (y [B, T, D], cache).

        With a cache, the T new tokens follow each row's cached context (see `Attention`);
        segment_ids then only mark padding, which neither branch reads.
        """
        batch, length, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        window_out, window_cache = self.attend(
            apply_rotary(q, positions, self.rope_theta, self.rope_scaling),
            apply_rotary(k, positions, self.rope_theta, self.rope_scaling), v,
            segment_ids=segment_ids, cache=None if cache is None else cache.window)
        to_query_heads = lambda a: jnp.repeat(a, self.heads // a.shape[2], axis=2)
        phi = functools.partial(feature_maps.apply_fixed, "softmax")
        tokens = dict(q=phi(q), k=to_query_heads(phi(k)), v=to_query_heads(v).astype(jnp.float32),
                      log_g=to_query_heads(jax.nn.log_sigmoid(k.astype(jnp.float32)) / GATE_NORMALIZER))
        recurrent_out, recurrent_cache = self.recur(
            functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0), tokens,
            None if cache is None else cache.recurrent, segment_ids)
        out = (0.5 * recurrent_out + 0.5 * window_out).astype(x.dtype)
        if cache is not None:
            cache = LigerCache(recurrent=recurrent_cache, window=window_cache)
        return self.o_proj(out.reshape(batch, length, -1)), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> LigerCache:
        """An empty cache: a zero state and W empty slots per row, whatever max_len."""
        return LigerCache(recurrent=RecurrentMixer.init_cache(self, batch, max_len, dtype),
                          window=Attention.init_cache(self, batch, max_len, dtype))
