"""Mamba2 (SSD): a selective state space model, run as scalar-decay linear attention.

    z, x, B, C, dt = (x_in W_in + b_in) * [m_z, m_x, m_B, m_C, m_dt]   (x: I = H * P channels,
                                                                        B, C: G groups of N)
    x, B, C        = silu(conv([x, B, C]) + b_conv)   (short causal depthwise convolution)
    dt             = clip(softplus(dt + dt_bias), *time_step_limit),   log a_t = -exp(A_log) dt_t
    h_t            = a_t h_{t-1} + B_t (dt_t x_t)^T,    y_t = h_t^T C_t + D x_t   (h: [N, P] per head)
    out            = RMSNorm_G(y * silu(z)) W_out + b_out           (output_norm "gate_then_norm")
                     RMSNorm_G(y) * silu(z) W_out + b_out           ("norm_then_gate", Falcon-H1)
                     (y * silu(z)) W_out + b_out                     (None)

Head h reads the B and C of group h // (H / G), so per head the recurrence is `chunk_gla` with
q = C, k = B (G grouped heads), v = dt x and a per-head decay: the SSD duality. RMSNorm_G takes
its statistics over each group of I / G channels apart. The defaults (one group, I = expand * D
in the model's n_heads heads, no biases or clamps, unit multipliers) are the original Mamba2
mixer; the options are those of the Mamba-2, Nemotron-H and Falcon-H1 checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Literal

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

OutputNorm = Literal["gate_then_norm", "norm_then_gate"]
SEGMENTS = ("z", "x", "B", "C", "dt")  # the input projection's outputs, in order


@dataclasses.dataclass
class Mamba2Config:
    state_dim: int = 64  # N
    expand: int = 2  # inner channels I = expand * d_model, unless head_dim is set
    conv_width: int = 4
    num_heads: int | None = None  # H; None: the model's n_heads
    head_dim: int | None = None  # P; None: I / H. Set: I = H * P (Nemotron-H, Falcon-H1's mamba_d_ssm)
    n_groups: int = 1  # G groups of B and C
    # dt is clipped to [low, high] after the softplus (Mamba2's time_step_limit; Nemotron-H's
    # time_step_min as the low end); [0, inf] clips nothing
    time_step_limit: list[float] = dataclasses.field(default_factory=lambda: [0.0, math.inf])
    output_norm: OutputNorm | None = "gate_then_norm"  # where the silu(z) gate meets the grouped RMSNorm
    norm_eps: float | None = None  # the output norm's; None: the model's norm_eps
    conv_bias: bool = False
    in_proj_bias: bool = False
    out_proj_bias: bool = False
    # muP multipliers of the input projection's outputs [z, x, B, C, dt] (Falcon-H1's ssm_multipliers)
    in_proj_multipliers: list[float] = dataclasses.field(default_factory=lambda: [1.0] * len(SEGMENTS))
    chunk_size: int = 64  # the chunked op's (a multiple of 16); changes the speed, never the result

    def validate(self, path: str) -> None:
        for key in ("state_dim", "expand", "conv_width", "n_groups"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("num_heads", "head_dim"):
            require(getattr(self, key) is None or getattr(self, key) >= 1, path, key,
                    f"must be >= 1 or null, got {getattr(self, key)}")
        low_high = self.time_step_limit
        require(len(low_high) == 2 and 0.0 <= low_high[0] <= low_high[1], path, "time_step_limit",
                f"must be [low, high] with 0 <= low <= high, got {low_high}")
        require(len(self.in_proj_multipliers) == len(SEGMENTS), path, "in_proj_multipliers",
                f"must hold {len(SEGMENTS)} values ({', '.join(SEGMENTS)}), got {self.in_proj_multipliers}")
        require(self.chunk_size >= 16 and self.chunk_size % 16 == 0, path, "chunk_size",
                f"must be a positive multiple of 16, got {self.chunk_size}")
        require(self.norm_eps is None or self.norm_eps > 0, path, "norm_eps", f"must be positive, got {self.norm_eps}")

    def heads(self, model_config) -> tuple[int, int]:
        """(H, P): the number of heads and their width in a model of `model_config`."""
        heads = self.num_heads or model_config.n_heads
        return heads, self.head_dim or self.expand * model_config.d_model // heads


@register_mixer("mamba2", Mamba2Config)
class Mamba2(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; H heads of P channels (I = H * P), G groups of B and C, state
    [N, P] per head."""

    CONVOLUTIONS = ("conv",)

    def __init__(self, model_config, config: Mamba2Config, *, rngs: nnx.Rngs):
        d_model = model_config.d_model
        heads, head_dim = config.heads(model_config)
        inner = heads * head_dim
        if not config.head_dim and inner != config.expand * d_model:
            raise ValueError(f"mamba2: expand * d_model = {config.expand * d_model} is not divisible by {heads} heads")
        if heads % config.n_groups:
            raise ValueError(f"mamba2: {heads} heads do not split into n_groups = {config.n_groups}")
        self.init_state(heads, config.state_dim, head_dim)
        self.inner, self.groups, self.state_dim = inner, config.n_groups, config.state_dim
        group_width = config.n_groups * config.state_dim
        sizes = (inner, inner, group_width, group_width, heads)  # SEGMENTS' widths
        self.edges = tuple(itertools.accumulate(sizes[:-1]))
        self.multipliers = tuple(config.in_proj_multipliers)
        self.time_step_limit = tuple(config.time_step_limit)
        self.output_norm, self.chunk_size = config.output_norm, config.chunk_size
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        self.in_proj = projection(d_model, sum(sizes), ("embed", "heads"), std=std, rngs=rngs,
                                  bias=config.in_proj_bias)
        self.conv = ShortConvolution(inner + 2 * group_width, config.conv_width, bias=config.conv_bias, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs)
        self.D = nnx.Param(jnp.ones((heads,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
        norm = RMSNorm(inner, eps=config.norm_eps or model_config.norm_eps, groups=config.n_groups)
        self.norm = nnx.data(norm if config.output_norm else None)  # a submodule or None, a pytree child either way
        self.out_proj = projection(inner, d_model, ("heads", "embed"), std=out_std, rngs=rngs,
                                   bias=config.out_proj_bias)

    def token_axes(self, name: str, x) -> tuple[str | None, ...]:
        """q = C and k = B are [B, T, G, N], G groups of heads sharing them, split like grouped
        attention's kv heads."""
        return ("batch", "length", "kv_heads", None) if name in ("q", "k") else super().token_axes(name, x)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D] in x's dtype, cache)."""
        del positions
        batch, length, _ = x.shape
        z, values, b, c, dt = (part * multiplier for part, multiplier in
                               zip(jnp.split(self.in_proj(x), self.edges, axis=-1), self.multipliers))
        xbc, tail = self.conv(jnp.concatenate([values, b, c], axis=-1), segment_ids=segment_ids,
                              tail=None if cache is None else cache.conv_tails[0])
        values, b, c = jnp.split(xbc, [self.inner, self.inner + self.groups * self.state_dim], axis=-1)
        values = self.split_heads(values)
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...]), *self.time_step_limit)  # [B, T, H]
        grouped = lambda m: m.reshape(batch, length, self.groups, self.state_dim)
        tokens = dict(q=grouped(c), k=grouped(b), v=values.astype(jnp.float32) * dt[..., None],
                      log_a=-jnp.exp(self.A_log[...]) * dt)
        y, cache = self.recur(functools.partial(chunk_gla, scale=1.0, chunk_size=self.chunk_size),
                              functools.partial(gla_step, scale=1.0), tokens, cache, segment_ids, conv_tails=(tail,))
        y = (y + self.D[...][:, None] * values.astype(jnp.float32)).reshape(batch, length, self.inner)
        gate = jax.nn.silu(z.astype(jnp.float32))
        if self.output_norm == "gate_then_norm":
            y = self.norm(y * gate)
        elif self.output_norm == "norm_then_gate":
            y = self.norm(y) * gate
        else:
            y = y * gate
        return self.out_proj(y.astype(x.dtype)), cache
