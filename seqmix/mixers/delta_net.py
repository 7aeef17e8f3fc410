"""DeltaNet and Gated DeltaNet: the delta rule over short-convolved, L2-normalised queries and keys.

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))    (per head after the convs)
    q, k    = q / ||q||, k / ||k||,    beta = sigmoid(x W_b)  (x2 with negative eigenvalues)
    S_t     = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)
    y       = (RMSNorm(o) [* silu(x W_g)]) W_o

DeltaNet has a_t = 1. Gated DeltaNet decays with a Mamba2-style gate,
log a_t = -exp(A_log) * softplus(x W_a + dt_bias), and gates its output. Training runs the chunked
`chunk_delta_rule`; a cache carries the state and the convolutions' tails, so prefill is one
chunked call and each decode step one `delta_step`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm, l2_normalize
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent_cache import RecurrentCache, run_recurrence
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.delta import chunk_delta_rule, delta_step


@dataclasses.dataclass
class DeltaNetConfig:
    conv_width: int = 4  # taps of the causal depthwise convolutions on q, k and v
    expand_v: float = 1.0  # value head dim = expand_v * head_dim
    negative_eigenvalues: bool = False  # beta in (0, 2) instead of (0, 1)
    output_gate: bool = False  # y = RMSNorm(o) * silu(x W_g)
    decays: ClassVar[bool] = False

    def validate(self, path: str) -> None:
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")
        require(self.expand_v > 0, path, "expand_v", f"must be positive, got {self.expand_v}")


@dataclasses.dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    expand_v: float = 2.0
    output_gate: bool = True
    decays: ClassVar[bool] = True


def _decay_parameters(heads: int, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """Mamba2's initialisation: A ~ U(1, 16), and dt_bias the inverse softplus of a time step
    drawn log-uniformly in [1e-3, 1e-1], so early decays span short and long memories."""
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, 1.0, 16.0)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (heads,), jnp.float32, math.log(1e-3), math.log(1e-1)))
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    as_param = lambda value: nnx.Param(value, out_sharding=("heads",), eager_sharding=False)
    return as_param(jnp.log(a)), as_param(dt_bias)


@register_mixer("deltanet", DeltaNetConfig)
@register_mixer("gated_deltanet", GatedDeltaNetConfig)
class DeltaNet(nnx.Module):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim head_dim and value dim expand_v * head_dim."""

    def __init__(self, model_config, config: DeltaNetConfig, *, rngs: nnx.Rngs):
        d_model, heads = model_config.d_model, model_config.n_heads
        self.key_dim = model_config.dim_per_head
        self.value_dim = int(round(config.expand_v * self.key_dim))
        self.heads = heads
        self.decays, self.gated_output = config.decays, config.output_gate
        self.beta_scale = 2.0 if config.negative_eigenvalues else 1.0
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        key_width, value_width = heads * self.key_dim, heads * self.value_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.b_proj = projection(d_model, heads, ("embed", "heads"), std=std, rngs=rngs)
        self.q_conv = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.k_conv = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.v_conv = ShortConvolution(value_width, config.conv_width, rngs=rngs)
        if self.decays:
            self.a_proj = projection(d_model, heads, ("embed", "heads"), std=std, rngs=rngs)
            self.A_log, self.dt_bias = _decay_parameters(heads, rngs)
        if self.gated_output:
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
        tails = (None, None, None) if cache is None else cache.conv_tails
        convolved = [conv(proj(x), segment_ids=segment_ids, tail=tail) for conv, proj, tail in
                     zip((self.q_conv, self.k_conv, self.v_conv), (self.q_proj, self.k_proj, self.v_proj), tails)]
        (q, q_tail), (k, k_tail), (v, v_tail) = convolved
        q, k = (l2_normalize(self._heads(a)).astype(x.dtype) for a in (q, k))
        v = self._heads(v)
        beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        log_a = None
        if self.decays:
            step = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
            log_a = -jnp.exp(self.A_log[...]) * step
        out, state = run_recurrence(chunk_delta_rule, delta_step, dict(q=q, k=k, v=v, beta=beta, log_a=log_a),
                                    None if cache is None else cache.state, segment_ids)
        if cache is not None:
            cache = RecurrentCache(state=state, conv_tails=(q_tail, k_tail, v_tail), lengths=cache.lengths + length)
        out = self.o_norm(out)
        if self.gated_output:
            out = out * jax.nn.silu(self._heads(self.g_proj(x)))
        return self.o_proj(out.reshape(batch, length, -1)), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> RecurrentCache:
        """An empty cache; its size does not depend on max_len."""
        del max_len
        tail = lambda conv: jnp.zeros((batch, conv.width - 1, conv.weight.shape[1]), dtype)
        return RecurrentCache(
            state=jnp.zeros((batch, self.heads, self.key_dim, self.value_dim), jnp.float32),
            conv_tails=(tail(self.q_conv), tail(self.k_conv), tail(self.v_conv)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )
