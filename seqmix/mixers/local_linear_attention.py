"""Local Linear Attention (LLA; Zuo et al. 2025, "Local Linear Attention: An Optimal
Interpolation of Linear and Softmax Attention For Test-Time Regression"), causal.

Attention as test-time regression of values on keys: softmax attention is the Nadaraya-Watson
(local constant) estimate at the query, sum_j p_j v_j. LLA fits a local *linear* model around the
query instead and answers with its intercept:

    p_j      = softmax_j(q_i . k_j / sqrt(D))  over the keys j <= i of i's segment
    (b, W)   = argmin  sum_j p_j ||v_j - b - W (k_j - q_i)||^2 + lambda ||W||_F^2
    o_i      = b = v_bar + Cov(v, k) (Cov(k, k) + lambda I)^-1 (q_i - k_bar)

with k_bar = sum_j p_j k_j, v_bar = sum_j p_j v_j and the p-weighted covariances (the closed form
comes from minimising over b first: b = v_bar - W (k_bar - q_i)). The first term is softmax
attention; the second corrects it along the local slope of v in k. As lambda grows LLA becomes
softmax attention; with flat weights (scale -> 0) it becomes a global ridge regression of v on k
evaluated at q, the fit that linear attention approximates.

The op (`seqmix.pallas_kernels.local_linear_attention`) computes this blockwise, after the
paper's FlashLLA, in O(T D^2) memory per head and O(T^2 D^2) time, the method's own cost.

Decoding keeps every key and value (attention's global `KVCache`): the weights depend on the query,
so no fixed-size summary of the past exists.

Departures from the paper, and why:
- the weights are the softmax-normalised p_j, where the paper's objective weighs by the kernel
  values w_j = exp(q.k / sqrt(D)) themselves (the same fit with lambda / sum_j w_j in place of
  lambda): normalised, the ridge is in units of the keys' local variance and does not fade as
  logits grow, and the [D, D] system's eigenvalues stay >= lambda, which keeps the float32 solve
  well conditioned.
- each query's system is solved directly (LU on the materialised [D, D] covariance) rather than by
  the paper's matrix-free conjugate gradient: at the head widths seqmix trains (D <= 64) the
  moments are cheap to hold and the solve is exact.
- queries and keys carry the attention mixer's RoPE (and its other options), so that LLA takes an
  attention layer's place as is; the regression then runs in rotated key space.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from seqmix.configuration import require
from seqmix.mixers.attention import Attention, AttentionConfig, KVCache, appended, attention_mask
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.local_linear_attention import local_linear_attention


@dataclasses.dataclass
class LocalLinearAttentionConfig(AttentionConfig):
    ridge: float = 1.0  # lambda, the ridge on the local slope W
    block_size: int = 64  # queries and keys per block of the blockwise algorithm

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.sliding_window is None, path, "sliding_window",
                "local linear attention is global (its decode cache holds every token)")
        require(self.ridge > 0, path, "ridge", f"must be positive, got {self.ridge}")
        require(self.block_size > 0, path, "block_size", f"must be positive, got {self.block_size}")


@register_mixer("local_linear_attention", LocalLinearAttentionConfig)
class LocalLinearAttention(Attention):
    """Attention's projections, RoPE and options with the local linear estimate in place of the
    softmax average: x [B, T, D] -> [B, T, D]."""

    def __init__(self, model_config, config: LocalLinearAttentionConfig, *, rngs):
        super().__init__(model_config, config, rngs=rngs)
        self.ridge, self.block_size = config.ridge, config.block_size

    def attend(self, q, k, v, *, segment_ids, cache: KVCache | None):
        """As `Attention.attend` (global; with a cache, the new tokens append to it and see every
        real cached token), with each query's local linear estimate. Returns (out [B, T, H, D] in
        q's dtype, the updated cache or None)."""
        batch, length, heads = q.shape[:3]
        if cache is None:
            index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids)
        else:
            real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
            cache, mask = appended(cache, k, v, real)
            k, v = cache.k, cache.v
        groups = heads // k.shape[2]  # grouped-query heads: query head h reads kv head h // groups
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = local_linear_attention(q, k, v, mask, scale=self.head_dim ** -0.5, ridge=self.ridge,
                                     block_size=self.block_size)
        return out.astype(q.dtype), cache
