"""Multi-head latent attention (MLA: DeepSeek-V2/V3; Kimi Linear's global layers): every head's
keys and values come from one compressed latent per token, and the decode cache keeps only that.

    q             = x W_q,  or RMSNorm(x W_qa) W_qb with q_lora_rank     per head [q_nope (Dn) | q_rope (Dr)]
    [c | k_rope]  = x W_kva                     (kv_a_proj_with_mqa: the latent, R, and one rotary key, Dr)
    c             = RMSNorm(c)                  (kv_a_layernorm)
    [k_nope | v]  = c W_kvb                     per head, Dn and Dv (kv_b_proj)
    k             = [k_nope | k_rope]           (k_rope shared by all heads)
    RoPE on q_rope and k_rope, unless rope is off (Kimi Linear's MLA has no positions at all)
    y             = softmax(q . k / sqrt(Dn + Dr)) v  W_o           (causal, within segments)

Decoding caches [c | k_rope] per token, R + Dr numbers instead of 2 H D, and attends in the latent
space: with kv_b_proj split per head into W_k [R, Dn] and W_v [R, Dv], q_nope . k_nope =
(W_k q_nope) . c and the output is (sum_s w_s c_s) W_v, so no cached token is ever expanded. The
training forward expands the keys and values once, which is cheaper when every token queries.
Parameter names are transformers' DeepSeek-V3 / Kimi Linear ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.mixers.attention import KVCache, appended, sequence_attention
from seqmix.mixers.registry import register_mixer

LATENT_NORM_EPS = 1e-6  # kv_a_layernorm's and q_a_layernorm's, whatever the model's norm_eps


@dataclasses.dataclass
class MLAConfig:
    kv_lora_rank: int = 64  # R: the latent each token's keys and values come from
    q_lora_rank: int | None = None  # a low-rank query projection through a norm; None: one projection
    qk_nope_head_dim: int | None = None  # Dn; None: the model's head_dim
    qk_rope_head_dim: int = 16  # Dr: the rotary part of q and of the shared key
    v_head_dim: int | None = None  # Dv; None: the model's head_dim
    rope: bool = True  # false: no positions (Kimi Linear)

    def validate(self, path: str) -> None:
        require(self.kv_lora_rank >= 1, path, "kv_lora_rank", f"must be >= 1, got {self.kv_lora_rank}")
        require(self.q_lora_rank is None or self.q_lora_rank >= 1, path, "q_lora_rank",
                f"must be >= 1 or null, got {self.q_lora_rank}")
        require(self.qk_rope_head_dim >= 0 and self.qk_rope_head_dim % 2 == 0, path, "qk_rope_head_dim",
                f"must be even and >= 0, got {self.qk_rope_head_dim}")
        for key in ("qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, key)
            require(value is None or value >= 1, path, key, f"must be >= 1 or null, got {value}")


@register_mixer("mla", MLAConfig)
class MultiHeadLatentAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D]; n_heads heads (see the module docstring)."""

    def __init__(self, model_config, config: MLAConfig, *, rngs: nnx.Rngs):
        d_model, self.heads = model_config.d_model, model_config.n_heads
        self.nope_dim = config.qk_nope_head_dim or model_config.dim_per_head
        self.rope_dim, self.rank = config.qk_rope_head_dim, config.kv_lora_rank
        self.value_dim = config.v_head_dim or model_config.dim_per_head
        self.rope, self.rope_theta, self.rope_scaling = config.rope, model_config.rope_theta, model_config.rope_scaling
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        query_width = self.heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank is None:
            self.q_proj = projection(d_model, query_width, ("embed", "heads"), std=std, rngs=rngs)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = projection(d_model, config.q_lora_rank, ("embed", None), std=std, rngs=rngs)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = projection(config.q_lora_rank, query_width, (None, "heads"), std=std, rngs=rngs)
        self.kv_a_proj_with_mqa = projection(d_model, self.rank + self.rope_dim, ("embed", None), std=std, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = projection(self.rank, self.heads * (self.nope_dim + self.value_dim), (None, "heads"),
                                    std=std, rngs=rngs)
        self.o_proj = projection(self.heads * self.value_dim, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def _queries(self, x):
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _rotated(self, x, positions):
        return apply_rotary(x, positions, self.rope_theta, self.rope_scaling) if self.rope else x

    def __call__(self, x, *, segment_ids=None, positions=None, cache: KVCache | None = None):
        """x [B, T, D]; segment_ids, positions [B, T] int32. Returns (y [B, T, D], cache): as
        `Attention`, with a cache of latents (`init_cache`)."""
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        q = self._queries(x).reshape(batch, length, self.heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q[..., :self.nope_dim], self._rotated(q[..., self.nope_dim:], positions)
        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[..., :self.rank])  # [B, T, R]
        k_rope = self._rotated(compressed[..., None, self.rank:], positions)  # [B, T, 1, Dr]
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        if cache is None:
            kv = self.kv_b_proj(latent).reshape(batch, length, self.heads, self.nope_dim + self.value_dim)
            k = jnp.concatenate([kv[..., :self.nope_dim],
                                 jnp.broadcast_to(k_rope, (batch, length, self.heads, self.rope_dim))], axis=-1)
            out = sequence_attention(jnp.concatenate([q_nope, q_rope], axis=-1), k, kv[..., self.nope_dim:],
                                     segment_ids, scale)
        else:
            out, cache = self._attend_to_latents(q_nope, q_rope, latent, k_rope, segment_ids, cache, scale)
        return self.o_proj(out.reshape(batch, length, -1)), cache

    def _attend_to_latents(self, q_nope, q_rope, latent, k_rope, segment_ids, cache, scale):
        """Decoding in the latent space (see the module docstring): appends [c | k_rope] of the T
        new tokens to the cache, then (out [B, T, H, Dv] in q's dtype, the updated cache)."""
        batch, length = latent.shape[:2]
        real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
        entries = jnp.concatenate([latent, k_rope[:, :, 0].astype(latent.dtype)], axis=-1)[:, :, None]
        cache, mask = appended(cache, entries, jnp.zeros((batch, length, 1, 0), entries.dtype), real)
        latents, rope_keys = cache.k[:, :, 0, :self.rank], cache.k[:, :, 0, self.rank:]
        by_head = self.kv_b_proj.kernel[...].astype(q_nope.dtype).reshape(self.rank, self.heads, -1)
        f32 = jnp.float32
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, by_head[..., :self.nope_dim], preferred_element_type=f32)
        logits = (jnp.einsum("bthr,bsr->bhts", q_latent, latents.astype(f32))
                  + jnp.einsum("bthd,bsd->bhts", q_rope, rope_keys.astype(q_rope.dtype), preferred_element_type=f32))
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits * scale, jnp.finfo(f32).min), axis=-1)
        context = jnp.einsum("bhts,bsr->bthr", weights, latents.astype(f32))
        out = jnp.einsum("bthr,rhv->bthv", context, by_head[..., self.nope_dim:].astype(f32))
        return out.astype(q_nope.dtype), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        """An empty cache of max_len tokens per row whose k holds each token's [latent | rotary
        key] [B, S, 1, R + Dr] and whose v holds nothing (the values come from the latent)."""
        return KVCache(k=jnp.zeros((batch, max_len, 1, self.rank + self.rope_dim), dtype),
                       v=jnp.zeros((batch, max_len, 1, 0), dtype), valid=jnp.zeros((batch, max_len), bool),
                       lengths=jnp.zeros((batch,), jnp.int32))
