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

The paper's other two conversions are options of the same layer: `window: null` keeps only the
recurrence (y = r W_o: Liger-GLA), and `recurrence: hgrn2` swaps in Liger-HGRN2's
    log g_t = logsigmoid(k_t),   S_t = diag(g_t) S_{t-1} + (1 - g_t) v_t^T,   r_t = S_t^T phi(q_t).

Decoding carries both branches: the recurrence's [K, V] state per head and a ring buffer of the
last W keys and values (a `WindowedRecurrentCache`); neither grows with the context.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers import feature_maps
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.mixers.attention import Attention, AttentionConfig
from seqmix.mixers.recurrent import RecurrentMixer, WindowedRecurrentCache
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

GATE_NORMALIZER = 16.0  # log g = logsigmoid(k) / 16 keeps decays near 1 from the start


@dataclasses.dataclass
class LigerAttentionConfig:
    window: int | None = 64  # tokens each query sees in the softmax branch (itself included); null: no branch
    recurrence: Literal["gla", "hgrn2"] = "gla"
    qkv_bias: bool = False  # as the attention layer it converts (Qwen2)

    def validate(self, path: str) -> None:
        require(self.window is None or self.window > 0, path, "window", f"must be positive or null, got {self.window}")


@register_mixer("liger_attention", LigerAttentionConfig)
class LigerAttention(Attention, RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads query heads and n_kv_heads key/value heads of head_dim."""

    def __init__(self, model_config, config: LigerAttentionConfig, *, rngs: nnx.Rngs):
        super().__init__(model_config, AttentionConfig(sliding_window=config.window, qkv_bias=config.qkv_bias),
                         rngs=rngs)
        self.init_state(model_config.n_heads, self.head_dim, self.head_dim)
        self.recurrence = config.recurrence

    def __call__(self, x, *, segment_ids=None, positions=None, cache: WindowedRecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions [B, T] int32 (default:
        0..T-1 in every row), for the window branch's RoPE. Returns (y [B, T, D], cache).

        With a cache, the T new tokens follow each row's cached context (see `Attention`);
        segment_ids then only mark padding, which neither branch reads.
        """
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        recurrent_out, recurrent_cache = self.recur(
            functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
            self._recurrent_inputs(q, k, v), None if cache is None else cache.recurrent, segment_ids)
        if self.window is None:
            out, window_cache = recurrent_out, None
        else:
            window_out, window_cache = self.attend(
                apply_rotary(q, positions, self.rope_theta, self.rope_scaling),
                apply_rotary(k, positions, self.rope_theta, self.rope_scaling), v,
                segment_ids=segment_ids, cache=None if cache is None else cache.window)
            out = 0.5 * recurrent_out + 0.5 * window_out
        if cache is not None:
            cache = WindowedRecurrentCache(recurrent=recurrent_cache, window=window_cache)
        return self.o_proj(out.astype(x.dtype).reshape(batch, length, -1)), cache

    def _recurrent_inputs(self, q, k, v) -> dict:
        """chunk_gla's q, k, v, log_g [B, T, H, *] (float32) from the projections' heads: softmax
        features and a key-derived gate, key/value heads repeated to the query heads."""
        to_query_heads = lambda a: jnp.repeat(a, self.heads // a.shape[2], axis=2)
        phi = functools.partial(feature_maps.apply_fixed, "softmax")
        gate_logits = k.astype(jnp.float32)
        if self.recurrence == "gla":
            keys, log_g = phi(k), jax.nn.log_sigmoid(gate_logits) / GATE_NORMALIZER
        else:  # hgrn2: the forget gate sigmoid(k), its complement as the key
            keys, log_g = 1.0 - jax.nn.sigmoid(gate_logits), jax.nn.log_sigmoid(gate_logits)
        return dict(q=phi(q), k=to_query_heads(keys), v=to_query_heads(v).astype(jnp.float32),
                    log_g=to_query_heads(log_g))

    def init_cache(self, batch: int, max_len: int, dtype) -> WindowedRecurrentCache:
        """An empty cache: a zero state and W empty slots per row, whatever max_len."""
        window = None if self.window is None else Attention.init_cache(self, batch, max_len, dtype)
        return WindowedRecurrentCache(recurrent=RecurrentMixer.init_cache(self, batch, max_len, dtype), window=window)
