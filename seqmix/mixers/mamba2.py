"""Mamba2 (SSD): a selective state space model, run as scalar-decay linear attention.

    z, x, B, C, dt = x_in W_in                 (x: expand * D channels in n_heads heads of P)
    x, B, C        = silu(conv([x, B, C]))     (short causal depthwise convolution)
    dt             = softplus(dt + dt_bias),   log a_t = -exp(A_log) dt_t      (per head)
    h_t            = a_t h_{t-1} + B_t (dt_t x_t)^T,    y_t = h_t^T C_t + D x_t   (h: [N, P] per head)
    out            = RMSNorm(y * silu(z)) W_out

B and C are shared by all heads (one group), so per head the recurrence is `chunk_gla` with
q = C, k = B, v = dt x and a per-head decay: the SSD duality.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer, decay_parameters
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class Mamba2Config:
    state_dim: int = 64  # N
    expand: int = 2  # inner channels = expand * d_model
    conv_width: int = 4

    def validate(self, path: str) -> None:
        for key in ("state_dim", "expand", "conv_width"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")


@register_mixer("mamba2", Mamba2Config)
class Mamba2(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of expand * D / n_heads channels, state [N, P] per head."""

    def __init__(self, model_config, config: Mamba2Config, *, rngs: nnx.Rngs):
        d_model, heads = model_config.d_model, model_config.n_heads
        inner = config.expand * d_model
        if inner % heads:
            raise ValueError(f"mamba2: expand * d_model = {inner} is not divisible by n_heads = {heads}")
        self.init_state(heads, config.state_dim, inner // heads)
        self.inner, self.state_dim = inner, config.state_dim
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        self.in_proj = projection(d_model, 2 * inner + 2 * config.state_dim + heads, ("embed", "heads"), std=std,
                                  rngs=rngs)
        self.conv = ShortConvolution(inner + 2 * config.state_dim, config.conv_width, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs)
        self.D = nnx.Param(jnp.ones((heads,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
        self.norm = RMSNorm(inner, eps=model_config.norm_eps)
        self.out_proj = projection(inner, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        batch, length, _ = x.shape
        z, xbc, dt = jnp.split(self.in_proj(x), [self.inner, 2 * self.inner + 2 * self.state_dim], axis=-1)
        xbc, tail = self.conv(xbc, segment_ids=segment_ids, tail=None if cache is None else cache.conv_tails[0])
        values, b, c = jnp.split(xbc, [self.inner, self.inner + self.state_dim], axis=-1)
        values = self.split_heads(values)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        per_head = lambda m: jnp.broadcast_to(m[:, :, None, :], (batch, length, self.heads, self.state_dim))
        tokens = dict(q=per_head(c), k=per_head(b), v=values.astype(jnp.float32) * dt[..., None],
                      log_a=-jnp.exp(self.A_log[...]) * dt)
        y, cache = self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                              tokens, cache, segment_ids, conv_tails=(tail,))
        y = y + self.D[...][:, None] * values.astype(jnp.float32)
        y = (y.reshape(batch, length, self.inner) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
        return self.out_proj(self.norm(y)), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> RecurrentCache:
        """An empty cache (state and the convolution's tail); its size does not depend on max_len."""
        return super().init_cache(batch, max_len, dtype, conv_tails=(self.conv.empty_tail(batch, dtype),))
