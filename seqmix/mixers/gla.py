"""Gated linear attention (GLA): a per-key, data-dependent decay from a low-rank gate.

    q, k, v = x W_q, x W_k, x W_v                    (key head dim expand_k * head_dim)
    log g_t = logsigmoid(x W_down W_up + b) / gate_normalizer       (per head and key, <= 0)
    S_t     = diag(exp(log g_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
    y       = (RMSNorm(o) * silu(x W_g)) W_o

The normaliser (16 in the GLA paper) keeps decays near 1 at initialisation, so the state holds a
long context from the first step. Training runs the chunked `chunk_gla`; decoding carries the
[K, V] state per head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.partitioning import logical
from seqmix.mixers.recurrent_cache import RecurrentCache, run_recurrence
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class GLAConfig:
    expand_k: float = 0.5  # key head dim = expand_k * head_dim
    expand_v: float = 1.0  # value head dim = expand_v * head_dim
    gate_rank: int = 16  # rank of the gate's projection
    gate_normalizer: float = 16.0  # log g = logsigmoid(.) / gate_normalizer

    def validate(self, path: str) -> None:
        for key in ("expand_k", "expand_v", "gate_rank", "gate_normalizer"):
            require(getattr(self, key) > 0, path, key, f"must be positive, got {getattr(self, key)}")


@register_mixer("gla", GLAConfig)
class GatedLinearAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim expand_k * head_dim, value dim expand_v * head_dim."""

    def __init__(self, model_config, config: GLAConfig, *, rngs: nnx.Rngs):
        d_model, heads = model_config.d_model, model_config.n_heads
        self.heads = heads
        self.key_dim = max(1, int(round(config.expand_k * model_config.dim_per_head)))
        self.value_dim = max(1, int(round(config.expand_v * model_config.dim_per_head)))
        self.gate_normalizer = config.gate_normalizer
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        key_width, value_width = heads * self.key_dim, heads * self.value_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.gate_down = projection(d_model, config.gate_rank, ("embed", None), std=std, rngs=rngs)
        self.gate_up = nnx.Linear(config.gate_rank, key_width, dtype=None, param_dtype=jnp.float32,
                                  kernel_init=logical(nnx.initializers.normal(std), None, "heads"),
                                  bias_init=logical(nnx.initializers.zeros_init(), "heads"), rngs=rngs)
        self.g_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.o_norm = RMSNorm(self.value_dim, eps=model_config.norm_eps)
        self.o_proj = projection(value_width, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.heads, -1)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        batch, length, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        gate_logits = self._heads(self.gate_up(self.gate_down(x))).astype(jnp.float32)
        log_g = jax.nn.log_sigmoid(gate_logits) / self.gate_normalizer
        out, state = run_recurrence(chunk_gla, gla_step, dict(q=q, k=k, v=v, log_g=log_g),
                                    None if cache is None else cache.state, segment_ids)
        if cache is not None:
            cache = RecurrentCache(state=state, conv_tails=(), lengths=cache.lengths + length)
        out = self.o_norm(out) * jax.nn.silu(self._heads(self.g_proj(x)))
        return self.o_proj(out.reshape(batch, length, -1)), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> RecurrentCache:
        """An empty cache; its size does not depend on max_len."""
        del max_len, dtype
        return RecurrentCache(state=jnp.zeros((batch, self.heads, self.key_dim, self.value_dim), jnp.float32),
                              conv_tails=(), lengths=jnp.zeros((batch,), jnp.int32))
