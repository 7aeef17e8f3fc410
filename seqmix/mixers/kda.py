"""Kimi Delta Attention (KDA, Kimi Linear 2025): the gated delta rule with a per-key decay.

    q, k, v  = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))     (per head after the convs)
    q, k     = q / ||q||, k / ||k||,    beta_t = sigmoid(x W_b)            (x2 with negative eigenvalues)
    f_t      = x W_f_a W_f_b + dt_bias                                     (per head and key, low rank)
    log g_t  = -exp(A_log) * softplus(f_t)        or, with a lower bound L < 0,
    log g_t  = L * sigmoid(exp(A_log) * f_t)      (fla's `fused_kda_gate`; the decay stays >= exp(L))
    S'_t     = Diag(exp(log g_t)) S_{t-1}
    S_t      = S'_t + beta_t k_t (v_t - S'^T_t k_t)^T,    o_t = S_t^T q_t / sqrt(K)
    y        = (RMSNorm(o) * sigmoid(x W_g_a W_g_b)) W_o

Parameter names are those of Hugging Face's Kimi Linear KDA module (q/k/v_proj, q/k/v_conv1d,
f_a_proj, f_b_proj, b_proj, A_log, dt_bias, g_a_proj, g_b_proj, o_norm, o_proj), so a checkpoint
maps 1:1 (its A_log is stored [1, 1, H, 1], here [H]; its conv weights [C, 1, W], here [W, C] with
the taps reversed: `seqmix.models.hf.kimi_linear`).
Both low-rank projections have rank head_dim, as there. With `num_v_heads` (grouped value heads)
v, beta, the decay, the output gate and the state have num_v_heads heads, q and k num_heads; value
head j reads q/k head j // (num_v_heads / num_heads). Training runs `chunk_delta_rule` with log_g;
a cache carries the state and the convolutions' tails (one `delta_step` per decoded token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import l2_normalize
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent import (
    RecurrentCache, RecurrentMixer, decay_parameters, grouped_heads, softplus_log_decay, validate_head_options,
)
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.delta import chunk_delta_rule, delta_step


@dataclasses.dataclass
class KDAConfig:
    conv_width: int = 4  # taps of the causal depthwise convolutions on q, k and v
    num_heads: int | None = None  # q/k heads; None: the model's n_heads (Kimi's linear_attn_config.num_heads)
    head_dim: int | None = None  # head dim; None: the model's (linear_attn_config.head_dim)
    num_v_heads: int | None = None  # value heads, a multiple of num_heads (grouped value heads); None: num_heads
    negative_eigenvalues: bool = False  # beta in (0, 2) instead of (0, 1)
    gate_lower_bound: float | None = None  # L < 0: log g = L * sigmoid(exp(A_log) * f); None: the softplus form

    def validate(self, path: str) -> None:
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")
        validate_head_options(self, path)
        require(self.gate_lower_bound is None or self.gate_lower_bound < 0, path, "gate_lower_bound",
                f"must be negative or null, got {self.gate_lower_bound}")


@register_mixer("kda", KDAConfig)
class KimiDeltaAttention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; num_heads q/k heads and num_v_heads value heads, all of dim head_dim
    (the model's heads and head dim unless set)."""

    CONVOLUTIONS = ("q_conv1d", "k_conv1d", "v_conv1d")

    def __init__(self, model_config, config: KDAConfig, *, rngs: nnx.Rngs):
        d_model = model_config.d_model
        key_heads, head_dim, heads = grouped_heads(model_config, config, "kda")
        self.init_state(heads, head_dim, head_dim)
        self.init_output(model_config, head_dim, gated=False, rngs=rngs)  # KDA's own gate: sigmoid, low rank
        self.beta_scale = 2.0 if config.negative_eigenvalues else 1.0
        self.gate_lower_bound = config.gate_lower_bound
        std = model_config.init_std
        key_width, value_width = key_heads * head_dim, heads * head_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.q_conv1d = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.k_conv1d = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.v_conv1d = ShortConvolution(value_width, config.conv_width, rngs=rngs)
        self.f_a_proj = projection(d_model, head_dim, ("embed", None), std=std, rngs=rngs)
        self.f_b_proj = projection(head_dim, heads * head_dim, (None, "heads"), std=std, rngs=rngs)
        self.b_proj = projection(d_model, heads, ("embed", "heads"), std=std, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs, keys_per_head=head_dim)
        self.g_a_proj = projection(d_model, head_dim, ("embed", None), std=std, rngs=rngs)
        self.g_b_proj = projection(head_dim, value_width, (None, "heads"), std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        (q, k, v), tails = self.short_convolutions(
            x, ((self.q_proj, self.q_conv1d), (self.k_proj, self.k_conv1d), (self.v_proj, self.v_conv1d)), segment_ids,
            cache)
        q, k = (l2_normalize(a.reshape(*a.shape[:2], -1, self.key_dim)).astype(x.dtype) for a in (q, k))
        beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        tokens = dict(q=q, k=k, v=self.split_heads(v), beta=beta, log_g=self.log_decay(x))
        out, cache = self.recur(chunk_delta_rule, delta_step, tokens, cache, segment_ids, conv_tails=tails)
        gate = jax.nn.sigmoid(self.split_heads(self.g_b_proj(self.g_a_proj(x))).astype(jnp.float32))
        out = (self.o_norm(out).astype(jnp.float32) * gate).astype(x.dtype)
        return self.o_proj(out.reshape(*out.shape[:2], -1)), cache

    def log_decay(self, x):
        """x [B, T, D] -> log g [B, T, H, K] float32, <= 0 (>= gate_lower_bound when set)."""
        logits = self.split_heads(self.f_b_proj(self.f_a_proj(x)))
        if self.gate_lower_bound is None:
            return softplus_log_decay(logits, self.A_log, self.dt_bias)
        shifted = logits.astype(jnp.float32) + self.dt_bias[...].reshape(logits.shape[2:])
        return self.gate_lower_bound * jax.nn.sigmoid(jnp.exp(self.A_log[...])[:, None] * shifted)
