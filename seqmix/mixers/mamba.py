"""Mamba-1 (S6, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"), as
transformers' `MambaMixer`, and the block it shares with Longhorn (`SelectiveScanBlock`).

    x, z   = x_in W_in (+ b_in)                       (E = expand * d_model channels each)
    x      = silu(conv1d(x) + b_conv)                 (causal depthwise, conv_width taps)
    dt, B, C = x W_x                                  (dt_rank, N and N wide; no bias)
    dt     = softplus(dt W_dt + b_dt)                 [B, T, E]
    A      = -exp(A_log)                              [E, N], A_log = log(1..N) at init (S4D-real)
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]      (state [E, N])
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]
    out    = (y * silu(z)) W_out (+ b_out)

The scan is `selective_scan` (update="mamba"). Parameter names are transformers' (in_proj,
conv1d, x_proj, dt_proj, A_log, D, out_proj), so a Hugging Face import is a rename plus layouts
(Linear weights transposed; conv1d.weight [E, 1, W] -> [W, E] reversed in time, tap i reading
x_{t-i}). The SSM parameters are initialised as transformers does: A_log = log(1..N), D = 1,
dt_proj's weight ~ U(-dt_rank^-1/2, dt_rank^-1/2) and its bias the inverse softplus of a step
drawn log-uniformly in [1e-3, 1e-1] (floored at 1e-4), the convolution PyTorch's
(U(+-width^-1/2), bias 0).
Departures: in_proj and x_proj are drawn N(0, init_std^2) and out_proj N(0, init_std^2 / (2 L))
like every seqmix projection (transformers: N(0, 0.1^2), and Kaiming-uniform for out_proj); the
dt projection and the scan run in float32 whatever the compute dtype (transformers runs the
projection in the model's dtype). The state is kept as the recurrent layers' [E, N, 1] (E
channels, each an N-by-1 state), so the decode cache and state tuning are those of every
recurrent mixer. A Mamba model is `layer_pattern: [mamba]` with `mlp_hidden: 0`
(MambaForCausalLM's blocks are a norm and this mixer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.partitioning import logical
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.selective_scan import selective_scan, selective_scan_step

# transformers' MambaConfig defaults for the time step's initialisation
TIME_STEP_MIN, TIME_STEP_MAX, TIME_STEP_FLOOR = 1e-3, 1e-1, 1e-4


def _symmetric_uniform(bound: float):
    """An initializer drawing U(-bound, bound)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


@dataclasses.dataclass
class MambaConfig:
    state_dim: int = 16  # N
    expand: int = 2  # E = expand * d_model channels
    conv_width: int = 4
    dt_rank: int | Literal["auto"] = "auto"  # "auto": ceil(d_model / 16)
    use_bias: bool = False  # in_proj's and out_proj's
    conv_bias: bool = True
    chunk_size: int = 64  # the scan's chunks; changes the speed, never the result

    def validate(self, path: str) -> None:
        for key in ("state_dim", "expand", "conv_width", "chunk_size"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank >= 1), path, "dt_rank",
                f"must be 'auto' or an integer >= 1, got {self.dt_rank!r}")

    def rank(self, d_model: int) -> int:
        """The dt projection's rank in a model of width d_model."""
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else self.dt_rank


class SelectiveScanBlock(RecurrentMixer):
    """Mamba's mixer block around `selective_scan`: x [B, T, D] -> [B, T, D], E channels with
    [N, 1] states. A subclass names its `update`, turns the dt projection into step sizes
    (`step_sizes`), gives its A (`decay`) and the dt projection's bias at init (`dt_bias_init`)."""

    CONVOLUTIONS = ("conv1d",)

    update: str

    def __init__(self, model_config, config: MambaConfig, *, rngs: nnx.Rngs):
        d_model, n = model_config.d_model, config.state_dim
        inner, rank = config.expand * d_model, config.rank(d_model)
        self.init_state(inner, n, 1)
        self.inner, self.rank, self.state_dim, self.chunk_size = inner, rank, n, config.chunk_size
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        self.in_proj = projection(d_model, 2 * inner, ("embed", "heads"), std=std, rngs=rngs, bias=config.use_bias)
        self.conv1d = ShortConvolution(inner, config.conv_width, bias=config.conv_bias, rngs=rngs)
        self.x_proj = projection(inner, rank + 2 * n, ("heads", None), std=std, rngs=rngs)
        self.dt_proj = nnx.Linear(
            rank, inner, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
            kernel_init=logical(_symmetric_uniform(rank**-0.5), None, "heads"),
            bias_init=logical(self.dt_bias_init, "heads"))
        self.D = nnx.Param(jnp.ones((inner,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
        self.out_proj = projection(inner, d_model, ("heads", "embed"), std=out_std, rngs=rngs, bias=config.use_bias)

    def token_axes(self, name: str, x) -> tuple[str | None, ...]:
        """q = C and k = B are [B, T, N], the state size, which no mesh axis splits; v and dt
        [B, T, E] are split over their channels, Mamba's heads."""
        return ("batch", "length", None) if name in ("q", "k") else super().token_axes(name, x)

    def dt_bias_init(self, key, shape, dtype):
        """The dt projection's bias at init, [E] (an `nnx.initializers` initializer)."""
        raise NotImplementedError

    def step_sizes(self, logits):
        """dt [B, T, E] float32 from the dt projection's output."""
        raise NotImplementedError

    def decay(self):
        """A [E, N] float32, or None where the update has none."""
        raise NotImplementedError

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the recurrence is
        ordered). Returns (y [B, T, D] in x's dtype, cache)."""
        del positions
        values, z = jnp.split(self.in_proj(x), 2, axis=-1)
        values, tail = self.conv1d(values, segment_ids=segment_ids, tail=None if cache is None else cache.conv_tails[0])
        dt, b, c = jnp.split(self.x_proj(values), [self.rank, self.rank + self.state_dim], axis=-1)
        dt = self.step_sizes(self.dt_proj(dt.astype(jnp.float32)))
        a = self.decay()
        tokens = dict(q=c, k=b, v=values, dt=dt)
        y, cache = self.recur(functools.partial(self._scan, a), functools.partial(self._step, a), tokens, cache,
                              segment_ids, conv_tails=(tail,))
        y = (y.astype(jnp.float32) + self.D[...] * values.astype(jnp.float32)) * jax.nn.silu(z.astype(jnp.float32))
        return self.out_proj(y.astype(x.dtype)), cache

    # `recur`'s chunked op and decode step over tokens (q=C, k=B, v=x, dt) and the states of every
    # recurrent layer, [B, E, N, 1] (the op's [B, E, N] with a value axis of 1).
    def _scan(self, a, q, k, v, dt, *, segment_ids, initial_state=None, output_final_state=False):
        result = selective_scan(v, dt, a, k, q, update=self.update, segment_ids=segment_ids,
                                initial_state=None if initial_state is None else initial_state[..., 0],
                                output_final_state=output_final_state, chunk_size=self.chunk_size)
        return (result[0], result[1][..., None]) if output_final_state else result

    def _step(self, a, q, k, v, dt, state):
        y, state = selective_scan_step(v, dt, a, k, q, state[..., 0], update=self.update)
        return y, state[..., None]


@register_mixer("mamba", MambaConfig)
class Mamba(SelectiveScanBlock):
    """Mamba-1's mixer: x [B, T, D] -> [B, T, D], E = expand * D channels with N states each."""

    update = "mamba"

    def __init__(self, model_config, config: MambaConfig, *, rngs: nnx.Rngs):
        super().__init__(model_config, config, rngs=rngs)
        a = jnp.broadcast_to(jnp.arange(1, config.state_dim + 1, dtype=jnp.float32), (self.inner, config.state_dim))
        self.A_log = nnx.Param(jnp.log(a), out_sharding=("heads", None), eager_sharding=False)

    def dt_bias_init(self, key, shape, dtype):
        """The inverse softplus of dt ~ exp(U(log 1e-3, log 1e-1)), floored at 1e-4 (transformers')."""
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(TIME_STEP_MIN), math.log(TIME_STEP_MAX)))
        dt = jnp.maximum(dt, TIME_STEP_FLOOR)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    def step_sizes(self, logits):
        return jax.nn.softplus(logits)

    def decay(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))
