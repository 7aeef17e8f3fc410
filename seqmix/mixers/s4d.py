"""S4D: the diagonal state space model of "On the Parameterization and Initialization of Diagonal
State Space Models" (Gu, Gupta, Goel, Re 2022), trained through its convolution kernel and decoded
as a recurrence.

Per channel h of the mixer's width H (= d_model) and mode n < N/2 (the other N/2 modes are the
complex conjugates, hence the 2 Re below):

    x'(t) = A_n x(t) + B_n u(t),   y(t) = 2 Re(sum_n C_n x_n(t)) + D u(t)          (continuous)
    zero-order hold with step dt_h:  dA_n = exp(dt A_n),   dB_n = (dA_n - 1) / A_n * B_n
    s_t = dA s_{t-1} + dB u_t,       y_t = 2 Re(sum_n C_n s_{t,n}) + D u_t          (recurrence, decode)
    K_j = 2 Re(sum_n C_n dB_n dA_n^j),  y_t = sum_{j<=t} K_j u_{t-j} + D u_t        (convolution, training)

K is the Vandermonde product of the paper (materialised, [H, N/2, T] complex64, as its plain
implementation does; no Cauchy/pykeops kernel) and the convolution runs on
`seqmix.pallas_kernels.fftconv.causal_conv`, segment-aware, the kernel as long as the call.
Initialisations (`init`): S4D-Lin A_n = -1/2 + i pi n; S4D-Inv A_n = -1/2 + i N/pi (N/(2n+1) - 1)
(the HiPPO-LegS-derived one); log dt ~ U(log dt_min, log dt_max) per channel, C complex normal
(unit variance), B = 1, D ~ N(0, 1). Re A stays negative: the parameter is log(-Re A).
The block is the paper's: u = x (the SSM runs on each channel of the residual stream),
z = GELU(y), out = GLU(z W_out) with W_out [H, 2H] (a * sigmoid(b)).

Decode carries s [B, H, N/2] complex as float32 (real, imag) pairs. A prefill from a cached state
adds the state's zero-input response 2 Re(sum_n C_n dA_n^(t+1) s_n) to the tokens of the call's
first segment and returns the state after the call (another Vandermonde contraction), so prefill,
decode and the full forward agree. A learned start state (state tuning, `mixers.state_tuning`)
enters the forward the same way, as the state cached before the row.

Departures from the paper, and why:
- B is not a parameter: only the products C_n B_n reach the output (in the kernel and through the
  recurrence's state scale alike), so B = 1 with C trained is the same family of functions.
- Every parameter trains with the model's one learning rate: the paper gives A and dt a smaller
  one, which the trainer has no per-parameter setting for. As in the paper, A and dt get no weight
  decay (the optimizer's dynamics parameters, `train.optim`). No dropout.
- Packed rows: a convolution is positional, a recurrent state ignores padding; the layer compacts
  each row (`long_convolution`) so that padding never takes a time slot, as the recurrence has it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.mixers.long_convolution import compaction, last_tokens, take_rows
from seqmix.mixers.registry import register_mixer
from seqmix.mixers.state_tuning import LearnsInitialState
from seqmix.pallas_kernels.fftconv import causal_conv
from seqmix.pallas_kernels.segments import reset_groups

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass
class S4DConfig:
    state_dim: int = 64  # N: N/2 complex modes per channel (and their conjugates)
    init: str = "lin"  # S4D-Lin ("lin") or S4D-Inv ("inv") imaginary parts of A
    dt_min: float = 1e-3  # log dt ~ U(log dt_min, log dt_max) per channel at initialisation
    dt_max: float = 1e-1

    def validate(self, path: str) -> None:
        require(self.state_dim >= 2 and self.state_dim % 2 == 0, path, "state_dim",
                f"must be an even number >= 2 (conjugate pairs), got {self.state_dim}")
        require(self.init in ("lin", "inv"), path, "init", f"must be 'lin' or 'inv', got {self.init!r}")
        require(0 < self.dt_min <= self.dt_max, path, "dt_max",
                f"needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


def imaginary_parts(init: str, state_dim: int) -> np.ndarray:
    """Im A_n for n < N/2, float32: S4D-Lin pi n, S4D-Inv N/pi (N/(2n+1) - 1)."""
    n = np.arange(state_dim // 2)
    if init == "lin":
        return (np.pi * n).astype(np.float32)
    return (state_dim / np.pi * (state_dim / (2 * n + 1) - 1)).astype(np.float32)


@struct.dataclass
class S4DCache:
    """state [B, H, N/2, 2] float32: the complex state s (real, imag) after the tokens seen;
    lengths [B] int32 (tokens seen per row). Its size does not depend on the number of tokens."""

    state: jax.Array
    lengths: jax.Array


@register_mixer("s4d", S4DConfig)
class S4D(LearnsInitialState, nnx.Module):
    """x [B, T, D] -> [B, T, D]: log_dt [D], log_neg_real_a and imag_a [D, N/2], c [D, N/2, 2]
    (real, imag), d [D], out_proj [D, 2D]."""

    def __init__(self, model_config, config: S4DConfig, *, rngs: nnx.Rngs):
        width, modes = model_config.d_model, config.state_dim // 2
        param = lambda value, axes: nnx.Param(value, out_sharding=axes, eager_sharding=False)
        log_dt = jax.random.uniform(rngs.params(), (width,), jnp.float32, math.log(config.dt_min),
                                    math.log(config.dt_max))
        self.log_dt = param(log_dt, ("heads",))
        self.log_neg_real_a = param(jnp.full((width, modes), math.log(0.5), jnp.float32), ("heads", None))
        self.imag_a = param(jnp.broadcast_to(jnp.asarray(imaginary_parts(config.init, config.state_dim)),
                                             (width, modes)), ("heads", None))
        self.c = param(jax.random.normal(rngs.params(), (width, modes, 2), jnp.float32) * 0.5**0.5,
                       ("heads", None, None))
        self.d = param(jax.random.normal(rngs.params(), (width,), jnp.float32), ("heads",))
        out_std = model_config.init_std / (2 * model_config.n_layers) ** 0.5
        self.out_proj = projection(width, 2 * width, ("heads", "embed"), std=out_std, rngs=rngs)

    def discretized(self):
        """(log_da = dt A [H, N/2] complex64, db = (dA - 1) / A [H, N/2], c [H, N/2] complex64)."""
        a = -jnp.exp(self.log_neg_real_a[...].astype(jnp.float32)) + 1j * self.imag_a[...].astype(jnp.float32)
        log_da = jnp.exp(self.log_dt[...].astype(jnp.float32))[:, None] * a
        c = self.c[...].astype(jnp.float32)
        return log_da, jnp.expm1(log_da) / a, c[..., 0] + 1j * c[..., 1]

    def __call__(self, x, *, segment_ids=None, positions=None, cache: S4DCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the kernel is
        positional). Returns (out [B, T, D] in x's dtype, the updated cache or None)."""
        del positions
        u = x.astype(jnp.float32)
        stored = self.start_state(x.shape[0]) if cache is None else cache.state  # a learned start or None
        state = None if stored is None else stored[..., 0] + 1j * stored[..., 1]
        if cache is not None and x.shape[1] == 1:
            y, state = self.step(u[:, 0], state, None if segment_ids is None else segment_ids[:, 0] != 0)
            y = y[:, None]
        else:
            y, state = self.scan(u, state, segment_ids)
        z = jax.nn.gelu(y, approximate=False).astype(x.dtype)
        value, gate = jnp.split(self.out_proj(z), 2, axis=-1)
        out = value * jax.nn.sigmoid(gate)
        if cache is None:
            return out, None
        return out, S4DCache(state=jnp.stack([state.real, state.imag], axis=-1), lengths=cache.lengths + x.shape[1])

    def step(self, u, state, valid):
        """One decode step: u [B, H] float32, state [B, H, N/2] complex64, valid [B] bool or None.
        Returns (y [B, H] float32, state); a padding token outputs zero and keeps the state."""
        log_da, db, c = self.discretized()
        advanced = jnp.exp(log_da) * state + db * u[..., None]
        y = 2 * jnp.sum(c * advanced, axis=-1).real + self.d[...].astype(jnp.float32) * u
        if valid is None:
            return y, advanced
        return jnp.where(valid[:, None], y, 0.0), jnp.where(valid[:, None, None], advanced, state)

    def scan(self, u, state, segment_ids):
        """The convolution form: u [B, T, H] float32, state [B, H, N/2] complex64 or None (no
        cache), segment_ids [B, T] or None. Returns (y [B, T, H] float32, the state after the
        call or None)."""
        batch, length, _ = u.shape
        if segment_ids is not None:
            order, restore, count = compaction(segment_ids)
            u, segment_ids = take_rows(u, order), take_rows(segment_ids, order)
        else:
            count = jnp.full((batch,), length, jnp.int32)
        valid, groups = reset_groups(segment_ids, batch, length)
        u = jnp.where(valid[..., None], u, 0.0)
        log_da, db, c = self.discretized()
        powers = jnp.exp(log_da[..., None] * jnp.arange(length, dtype=jnp.float32))  # dA^j, [H, N/2, T]
        kernel = 2 * jnp.einsum("hn,hnt->ht", c * db, powers, precision=HIGHEST).real
        y = causal_conv(u, kernel, segment_ids=segment_ids) + self.d[...].astype(jnp.float32) * u
        if state is not None:
            # The cached state reaches the call's first segment: 2 Re(sum_n C_n dA_n^(t+1) s_n).
            response = 2 * jnp.einsum("bhn,hnt->bth", c * jnp.exp(log_da) * state, powers, precision=HIGHEST).real
            y = y + jnp.where((valid & (groups == 0))[..., None], response, 0.0)
            # The state after the row's last real token: its segment's inputs, each decayed by
            # dA^(last - s), and the cached state decayed by dA^count if that segment is the first.
            last_group = take_rows(groups, jnp.maximum(count - 1, 0)[:, None])[:, 0]
            own = jnp.where((valid & (groups == last_group[:, None]))[..., None], u, 0.0)
            window = last_tokens(own, count, length).astype(powers.dtype)  # window[t]: T-1-t before the end
            inputs = db * jnp.einsum("bth,hnt->bhn", window, powers[..., ::-1], precision=HIGHEST)
            carried = jnp.exp(log_da * count[:, None, None]) * state
            state = inputs + jnp.where((last_group == 0)[:, None, None], carried, 0.0)
        y = jnp.where(valid[..., None], y, 0.0)
        return (y if segment_ids is None else take_rows(y, restore)), state

    def initial_state_shape(self) -> tuple[int, ...]:
        return self.c.shape  # [H, N/2, 2]: the complex state's real and imaginary parts

    def init_cache(self, batch: int, max_len: int, dtype) -> S4DCache:
        """An empty cache (its state the learned start, if any); its size does not depend on max_len."""
        del max_len, dtype  # the state is float32 whatever the compute dtype
        start = self.start_state(batch)
        state = jnp.zeros((batch, *self.c.shape), jnp.float32) if start is None else start
        return S4DCache(state=state, lengths=jnp.zeros((batch,), jnp.int32))
