"""DeltaNet and Gated DeltaNet: the delta rule over short-convolved, L2-normalised queries and keys.

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))    (per head after the convs)
    q, k    = q / ||q||, k / ||k||,    beta = sigmoid(x W_b)  (x2 with negative eigenvalues)
    S_t     = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)
    y       = (RMSNorm(o) [* silu(x W_g)]) W_o

DeltaNet has a_t = 1. Gated DeltaNet decays with a Mamba2-style gate,
log a_t = -exp(A_log) * softplus(x W_a + dt_bias), and gates its output. With `num_v_heads`
(Qwen3-Next's grouped value heads) v, beta, a_t, the output gate and the state have num_v_heads
heads and q, k n_heads; value head j reads q/k head j // (num_v_heads / n_heads). Training runs
the chunked `chunk_delta_rule`; a cache carries the state and the convolutions' tails, so prefill
is one chunked call and each decode step one `delta_step`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

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
class DeltaNetConfig:
    conv_width: int = 4  # taps of the causal depthwise convolutions on q, k and v
    num_heads: int | None = None  # q/k heads; None: the model's n_heads (Qwen3-Next's linear_num_key_heads)
    head_dim: int | None = None  # key head dim; None: the model's head dim (linear_key_head_dim)
    expand_v: float = 1.0  # value head dim = expand_v * head_dim
    num_v_heads: int | None = None  # value heads, a multiple of num_heads (grouped value heads); None: num_heads
    negative_eigenvalues: bool = False  # beta in (0, 2) instead of (0, 1)
    output_gate: bool = False  # y = RMSNorm(o) * silu(x W_g)
    output_norm_eps: float | None = None  # the output RMSNorm's eps; None: the model's norm_eps (OLMo: 1e-5)
    decays: ClassVar[bool] = False
    householder_steps: ClassVar[int] = 1  # keys, values and betas per token (Gated DeltaProduct's n_h)

    def validate(self, path: str) -> None:
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")
        require(self.expand_v > 0, path, "expand_v", f"must be positive, got {self.expand_v}")
        require(self.output_norm_eps is None or self.output_norm_eps > 0, path, "output_norm_eps",
                f"must be positive or null, got {self.output_norm_eps}")
        validate_head_options(self, path)


@dataclasses.dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    expand_v: float = 2.0
    output_gate: bool = True
    decays: ClassVar[bool] = True


@register_mixer("deltanet", DeltaNetConfig)
@register_mixer("gated_deltanet", GatedDeltaNetConfig)
class DeltaNet(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; num_heads q/k heads of key dim head_dim (the model's unless set),
    num_v_heads value heads (the state's) of value dim expand_v * head_dim."""

    CONVOLUTIONS = ("q_conv", "k_conv", "v_conv")

    def __init__(self, model_config, config: DeltaNetConfig, *, rngs: nnx.Rngs):
        d_model = model_config.d_model
        key_heads, key_dim, heads = grouped_heads(model_config, config, "delta rule")
        self.init_state(heads, key_dim, int(round(config.expand_v * key_dim)))
        self.init_output(model_config, self.value_dim, gated=config.output_gate, rngs=rngs,
                         eps=config.output_norm_eps or model_config.norm_eps)
        self.decays = config.decays
        self.beta_scale = 2.0 if config.negative_eigenvalues else 1.0
        steps, std = config.householder_steps, model_config.init_std
        key_width, value_width = key_heads * self.key_dim, heads * self.value_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, steps * key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, steps * value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.b_proj = projection(d_model, steps * heads, ("embed", "heads"), std=std, rngs=rngs)
        self.q_conv = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.k_conv = ShortConvolution(steps * key_width, config.conv_width, rngs=rngs)
        self.v_conv = ShortConvolution(steps * value_width, config.conv_width, rngs=rngs)
        if self.decays:
            self.a_proj = projection(d_model, heads, ("embed", "heads"), std=std, rngs=rngs)
            self.A_log, self.dt_bias = decay_parameters(heads, rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        (q, k, v), tails = self.short_convolutions(
            x, ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv)), segment_ids, cache)
        beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        log_a = softplus_log_decay(self.a_proj(x), self.A_log, self.dt_bias) if self.decays else None
        q, k = (l2_normalize(a.reshape(*a.shape[:2], -1, self.key_dim)).astype(x.dtype) for a in (q, k))
        tokens = dict(q=q, k=k, v=v.reshape(*v.shape[:2], -1, self.value_dim), beta=beta, log_a=log_a)
        out, cache = self.recurrence(tokens, cache, segment_ids, tails)
        return self.output(out, x), cache

    def recurrence(self, tokens: dict, cache: RecurrentCache | None, segment_ids, conv_tails):
        """The delta rule over tokens q, k [B, T, n_heads, K], v [B, T, H, V], beta and log_a
        [B, T, H] (log_a None without decay); a Gated DeltaProduct's k, v and beta hold its
        householder_steps sub-steps (n_heads or H times n_h, sub-step major). Returns
        (o [B, T, H, V], the updated cache or None)."""
        return self.recur(chunk_delta_rule, delta_step, tokens, cache, segment_ids, conv_tails=conv_tails)
