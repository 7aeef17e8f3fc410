"""RetNet's multi-scale retention: linear attention with a fixed decay per head, and rotary q/k.

    S_t = gamma_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t / sqrt(K),    gamma_h = 1 - 2^(-5-h)
    y   = (RMSNorm(o) * silu(x W_g)) W_o

Head h forgets on a scale of 2^(5+h) tokens, so the heads together span short and long memory.
Rotary embeddings on q and k (at each token's position in its segment) stand in for RetNet's xPos.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class RetNetConfig:
    expand_v: float = 2.0  # value head dim = expand_v * head_dim

    def validate(self, path: str) -> None:
        require(self.expand_v > 0, path, "expand_v", f"must be positive, got {self.expand_v}")


def retention_log_decays(heads: int) -> jnp.ndarray:
    """log gamma_h = log(1 - 2^(-5-h)) for h < heads, [H] float32."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))))


@register_mixer("retnet", RetNetConfig)
class MultiScaleRetention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim head_dim, value dim expand_v * head_dim."""

    def __init__(self, model_config, config: RetNetConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, int(round(config.expand_v * head_dim)))
        self.init_output(model_config, self.value_dim, gated=True, rngs=rngs)
        self.rope_theta, self.rope_scaling = model_config.rope_theta, model_config.rope_scaling
        std = model_config.init_std
        self.q_proj = projection(d_model, heads * head_dim, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, heads * head_dim, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, heads * self.value_dim, ("embed", "heads"), std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions [B, T] int32 (default:
        0..T-1 in every row). Returns (y [B, T, D], cache)."""
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        q = apply_rotary(self.split_heads(self.q_proj(x)), positions, self.rope_theta, self.rope_scaling)
        k = apply_rotary(self.split_heads(self.k_proj(x)), positions, self.rope_theta, self.rope_scaling)
        v = self.split_heads(self.v_proj(x))
        log_a = jnp.broadcast_to(retention_log_decays(self.heads), (batch, length, self.heads))
        out, cache = self.recur(chunk_gla, gla_step, dict(q=q, k=k, v=v, log_a=log_a), cache, segment_ids)
        return self.output(out, x), cache
