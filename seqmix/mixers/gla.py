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
from seqmix.layers.partitioning import logical
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
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
class GatedLinearAttention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim expand_k * head_dim, value dim expand_v * head_dim."""

    def __init__(self, model_config, config: GLAConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, max(1, int(round(config.expand_k * head_dim))),
                        max(1, int(round(config.expand_v * head_dim))))
        self.init_output(model_config, self.value_dim, gated=True, rngs=rngs)
        self.gate_normalizer = config.gate_normalizer
        std = model_config.init_std
        key_width, value_width = heads * self.key_dim, heads * self.value_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.gate_down = projection(d_model, config.gate_rank, ("embed", None), std=std, rngs=rngs)
        self.gate_up = nnx.Linear(config.gate_rank, key_width, dtype=None, param_dtype=jnp.float32,
                                  kernel_init=logical(nnx.initializers.normal(std), None, "heads"),
                                  bias_init=logical(nnx.initializers.zeros_init(), "heads"), rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        gate_logits = self.split_heads(self.gate_up(self.gate_down(x))).astype(jnp.float32)
        log_g = jax.nn.log_sigmoid(gate_logits) / self.gate_normalizer
        out, cache = self.recur(chunk_gla, gla_step, dict(q=q, k=k, v=v, log_g=log_g), cache, segment_ids)
        return self.output(out, x), cache
