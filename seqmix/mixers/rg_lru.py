"""RecurrentGemma's recurrent block (Griffin, De et al. 2024): a GeLU branch gating a causal
convolution and the RG-LRU, a real-gated diagonal linear recurrence of lru_width channels.

    y      = gelu_tanh(x W_y + b_y)
    c      = conv(x W_x + b_x)                   (causal depthwise, width K, with a bias)
    i, r   = sigmoid(c_h W_i[h] + b_i[h]), sigmoid(c_h W_a[h] + b_a[h])   (H block-diagonal heads)
    log a  = -8 r softplus(recurrent_param)
    h_t    = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t c_t)     (a segment's first token: h_t = i_t c_t)
    out    = (h * y) W_out + b_out

With a learned start state h_0 (state tuning, `mixers.state_tuning`), a row's first token is
h_1 = a_1 h_0 + i_1 c_1: its input term as at any segment start, plus the start state decayed once
(with h_0 = 0, the default, the block is unchanged).

The state is h [B, lru_width] and the convolution's last K - 1 inputs, whatever the length.
Training and prefill run the recurrence as one scan over (a, u) pairs (`linear_scan`: parallel on
accelerators, sequential on CPU; a reset is a = 0, so no state crosses a packing boundary); a
decode step is the same scan of one token. The convolution stays within each segment too (transformers' runs across position
resets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.registry import register_mixer
from seqmix.mixers.state_tuning import LearnsInitialState

# Griffin clips the derivative of the input normaliser's square root, 1 / (2 sqrt(x)), at this
# value: near a = 1 it would otherwise blow up (NaNs in bfloat16 training).
MAX_SQRT_GRADIENT = 1000.0
LOG_A_SCALE = -8.0  # Griffin's c: log a = c * r * softplus(recurrent_param)


@dataclasses.dataclass
class RGLRUConfig:
    num_heads: int | None = None  # H blocks of the gates; None: the model's n_heads
    lru_width: int | None = None  # channels of the recurrence; None: d_model
    conv_width: int = 4

    def validate(self, path: str) -> None:
        for key in ("num_heads", "lru_width"):
            require(getattr(self, key) is None or getattr(self, key) >= 1, path, key,
                    f"must be >= 1 or null, got {getattr(self, key)}")
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")


@struct.dataclass
class RGLRUCache:
    """state [B, lru_width] float32 (h after the tokens seen); tail [B, K-1, lru_width] (the
    convolution's last inputs); lengths [B] int32 (tokens seen per row, padding included); started
    [B] bool (the row has seen a real token: its next one continues the state instead of resetting
    it). Nothing here grows with the number of tokens."""

    state: jax.Array
    tail: jax.Array
    lengths: jax.Array
    started: jax.Array


@jax.custom_jvp
def sqrt_bounded_derivative(x: jax.Array) -> jax.Array:
    """sqrt(x), whose derivative is clipped at MAX_SQRT_GRADIENT (any shape, float)."""
    return jnp.sqrt(x)


@sqrt_bounded_derivative.defjvp
def _sqrt_bounded_derivative_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.sqrt(x), dx / jnp.sqrt(jnp.maximum(4.0 * x, MAX_SQRT_GRADIENT ** -2))


def linear_scan(a: jax.Array, u: jax.Array, initial: jax.Array) -> jax.Array:
    """h_t = a_t h_{t-1} + u_t from h_{-1} = initial, for every t: a, u [B, T, C] float32,
    initial [B, C] float32 -> h [B, T, C] float32. On accelerators a parallel (associative) scan,
    log T steps deep; on CPU a sequential one, which XLA:CPU runs 1.8-3.6x faster forward and
    backward (benchmarks/linear_scan.py, RESULTS.md)."""
    return (_sequential_scan if jax.default_backend() == "cpu" else _parallel_scan)(a, u, initial)


def _parallel_scan(a, u, initial):
    """`linear_scan` as an associative scan of the affine maps h -> a h + u, composed as (a1, u1)
    then (a2, u2) = (a1 a2, a2 u1 + u2): products of a in [0, 1] only, which cannot overflow."""

    def compose(earlier, later):
        (a1, u1), (a2, u2) = earlier, later
        return a1 * a2, a2 * u1 + u2

    decay, offset = jax.lax.associative_scan(compose, (a, u), axis=1)
    return decay * initial[:, None, :] + offset


def _sequential_scan(a, u, initial):
    """`linear_scan` one token after another (`jax.lax.scan` over T)."""

    def step(state, token):
        decay, offset = token
        state = decay * state + offset
        return state, state

    _, states = jax.lax.scan(step, initial, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(u, 1, 0)))
    return jnp.moveaxis(states, 0, 1)


class RGLRU(nnx.Module):
    """The gates and recurrence of the RG-LRU: c [B, T, C] -> h [B, T, C] float32 (C = lru_width
    in `heads` blocks)."""

    def __init__(self, width: int, heads: int, *, std: float, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"rg_lru: lru_width = {width} is not divisible by {heads} heads")
        self.heads = heads
        block = width // heads
        gate = lambda: nnx.Param(std * jax.random.normal(rngs.params(), (heads, block, block), jnp.float32),
                                 out_sharding=("heads", None, None), eager_sharding=False)
        bias = lambda: nnx.Param(jnp.zeros((heads, block), jnp.float32), out_sharding=("heads", None),
                                 eager_sharding=False)
        self.input_gate_weight, self.input_gate_bias = gate(), bias()
        self.recurrent_gate_weight, self.recurrent_gate_bias = gate(), bias()
        # Griffin's initialisation: softplus(recurrent_param) = -log(u) / 2, u ~ U(0.9^2, 0.999^2),
        # so that the decays start spread over short and long memories.
        u = jax.random.uniform(rngs.params(), (width,), jnp.float32, 0.9 ** 2, 0.999 ** 2)
        self.recurrent_param = nnx.Param(jnp.log(jax.lax.rsqrt(u) - 1.0), out_sharding=("heads",),
                                         eager_sharding=False)

    def _gate(self, blocks, weight, bias):
        logits = jnp.einsum("bthi,hij->bthj", blocks, weight[...]) + bias[...]
        return jax.nn.sigmoid(logits).reshape(*blocks.shape[:2], -1)

    def __call__(self, c, *, reset, real, initial, from_initial):
        """c [B, T, C]; reset [B, T] bool (a segment's first token: the state starts there); real
        [B, T] bool (not padding: padding leaves the state as it is); initial [B, C] float32 (the
        state before the first token); from_initial [B, T] bool (reset tokens whose state before
        them is `initial`, which they decay: a row's first token). Returns h [B, T, C] float32."""
        c = c.astype(jnp.float32)
        blocks = c.reshape(*c.shape[:2], self.heads, -1)
        input_gate = self._gate(blocks, self.input_gate_weight, self.input_gate_bias)
        recurrent_gate = self._gate(blocks, self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = LOG_A_SCALE * recurrent_gate * jax.nn.softplus(self.recurrent_param[...])
        # sqrt(1 - a^2) normalises the input's contribution to the state; 1 - a^2 as -expm1(2 log a),
        # exact where a is near 1 (transformers' 1 - exp(2 log a) loses digits there).
        multiplier = jnp.where(reset[..., None], 1.0, sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a)))
        a = jnp.where((reset & ~from_initial)[..., None], 0.0, jnp.exp(log_a))
        u = c * input_gate * multiplier
        a, u = jnp.where(real[..., None], a, 1.0), jnp.where(real[..., None], u, 0.0)
        return linear_scan(a, u, initial)


@register_mixer("rg_lru", RGLRUConfig)
class RecurrentBlock(LearnsInitialState, nnx.Module):
    """x [B, T, D] -> [B, T, D]: linear_y, linear_x [D, C] and linear_out [C, D] (all with biases),
    conv_1d [K, C] with a bias, and the RG-LRU (`rg_lru`) over C = lru_width channels."""

    def __init__(self, model_config, config: RGLRUConfig, *, rngs: nnx.Rngs):
        d_model, width = model_config.d_model, config.lru_width or model_config.d_model
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        self.linear_y = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs, bias=True)
        self.linear_x = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs, bias=True)
        self.linear_out = projection(width, d_model, ("heads", "embed"), std=out_std, rngs=rngs, bias=True)
        self.conv_1d = ShortConvolution(width, config.conv_width, activation=False, bias=True, rngs=rngs)
        self.rg_lru = RGLRU(width, config.num_heads or model_config.n_heads, std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RGLRUCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the state
        restarts at each segment's first token, which segment_ids mark). Returns (y [B, T, D] in
        x's dtype, the updated cache or None)."""
        del positions
        batch, length, _ = x.shape
        segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
        started = jnp.zeros((batch,), bool) if cache is None else cache.started
        # The segment of the token before each one: for the call's first, the cached row's when
        # it has begun (a continuation), else none.
        before = jnp.concatenate([jnp.where(started, segments[:, 0], -1)[:, None], segments[:, :-1]], axis=1)
        real = segments != 0
        y = jax.nn.gelu(self.linear_y(x), approximate=True)
        c, tail = self.conv_1d(self.linear_x(x), segment_ids=segment_ids, tail=None if cache is None else cache.tail)
        initial = self.init_cache(batch, 0, x.dtype).state if cache is None else cache.state
        # The row's first real token starts from `initial` (zero, or the learned start state).
        first = real & (jnp.cumsum(real, axis=1) == 1) & ~started[:, None]
        h = self.rg_lru(c, reset=real & (segments != before), real=real, initial=initial, from_initial=first)
        out = self.linear_out(h.astype(x.dtype) * y)
        if cache is None:
            return out, None
        return out, RGLRUCache(state=h[:, -1], tail=tail, lengths=cache.lengths + length,
                               started=started | jnp.any(real, axis=1))

    def initial_state_shape(self) -> tuple[int, ...]:
        return self.rg_lru.recurrent_param.shape  # [lru_width]

    def init_cache(self, batch: int, max_len: int, dtype) -> RGLRUCache:
        """An empty cache (its state the learned start, if any); its size does not depend on max_len."""
        del max_len
        start = self.start_state(batch)
        state = jnp.zeros((batch, *self.initial_state_shape()), jnp.float32) if start is None else start
        return RGLRUCache(state=state, tail=self.conv_1d.empty_tail(batch, dtype),
                          lengths=jnp.zeros((batch,), jnp.int32), started=jnp.zeros((batch,), bool))
