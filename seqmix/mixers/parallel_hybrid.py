"""Falcon-H1's parallel hybrid: softmax attention and a Mamba2 SSM side by side on the same input,
each scaled on the way in and out, their outputs summed.

    y = m_attn_out * Attention(m_attn_in * x) + m_ssm_out * Mamba2(m_ssm_in * x)

The two halves keep their own options (`attention`, `mamba2`) and caches (a KV cache, or ring,
beside the SSM's constant state).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.mixers.attention import Attention, AttentionConfig, KVCache
from seqmix.mixers.mamba2 import Mamba2, Mamba2Config
from seqmix.mixers.recurrent import RecurrentCache
from seqmix.mixers.registry import register_mixer


@dataclasses.dataclass
class ParallelHybridConfig:
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    attention_multipliers: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])  # [in, out]
    mamba2_multipliers: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])  # [in, out]

    def validate(self, path: str) -> None:
        for key in ("attention_multipliers", "mamba2_multipliers"):
            require(len(getattr(self, key)) == 2, path, key, f"must be [in, out], got {getattr(self, key)}")


@struct.dataclass
class ParallelHybridCache:
    """attention: the attention half's KVCache; mamba2: the SSM half's RecurrentCache."""

    attention: KVCache
    mamba2: RecurrentCache

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: tokens seen per row (both halves have seen the same)."""
        return self.mamba2.lengths


@register_mixer("parallel_hybrid", ParallelHybridConfig)
class ParallelHybrid(nnx.Module):
    """x [B, T, D] -> [B, T, D]: `attention` (an `Attention`) plus `mamba` (a `Mamba2`)."""

    def __init__(self, model_config, config: ParallelHybridConfig, *, rngs: nnx.Rngs):
        self.attention = Attention(model_config, config.attention, rngs=rngs)
        self.mamba = Mamba2(model_config, config.mamba2, rngs=rngs)
        self.attention_multipliers = tuple(config.attention_multipliers)
        self.mamba2_multipliers = tuple(config.mamba2_multipliers)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: ParallelHybridCache | None = None):
        """x [B, T, D]; segment_ids, positions [B, T] int32 (as `Attention`). Returns (y [B, T, D], cache)."""
        (attention_in, attention_out), (mamba_in, mamba_out) = self.attention_multipliers, self.mamba2_multipliers
        attended, attention_cache = self.attention(x * attention_in, segment_ids=segment_ids, positions=positions,
                                                   cache=None if cache is None else cache.attention)
        mixed, mamba_cache = self.mamba(x * mamba_in, segment_ids=segment_ids,
                                        cache=None if cache is None else cache.mamba2)
        y = attended * attention_out + mixed * mamba_out
        return y, None if cache is None else ParallelHybridCache(attention=attention_cache, mamba2=mamba_cache)

    def learn_initial_state(self):
        """State tuning: the SSM half learns its initial state (attention has none)."""
        self.mamba.learn_initial_state()

    def init_cache(self, batch: int, max_len: int, dtype) -> ParallelHybridCache:
        """Both halves' empty caches (the attention's for max_len tokens, or its window)."""
        return ParallelHybridCache(attention=self.attention.init_cache(batch, max_len, dtype),
                                   mamba2=self.mamba.init_cache(batch, max_len, dtype))
