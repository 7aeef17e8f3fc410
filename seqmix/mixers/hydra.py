"""Hydra: a bidirectional (non-causal) state space mixer, a quasiseparable matrix mixer built from
two Mamba-2 (SSD) scans ("Hydra: Bidirectional State Space Models Through Generalized Matrix
Mixers", Hwang, Lahoti, Dao and Gu, 2024).

    QS(x) = shift(SS(x)) + flip(shift(SS(flip(x)))) + D x

SS is Mamba-2's selective scan (a scalar decay per head), flip reverses time, and shift moves the
outputs one token later (zero at the first token), so the forward scan fills the strictly lower
triangle of the T x T mixing matrix and the backward scan the strictly upper one; the diagonal
is D's. Per head, with x_t [P] and one group of B, C [N]:

    z, x, B_f, C_f, B_b, C_b, dt_f, dt_b = x_in W_in            (I = H * P channels, N-wide B, C)
    x, B_f, C_f, B_b, C_b = silu(conv([x, B_f, C_f, B_b, C_b]) + b_conv)   (centred, non-causal)
    dt_d = softplus(dt_d + dt_bias),   log a_{d,t} = -exp(A_log) dt_{d,t}   (A_log, dt_bias shared)
    forward:  h_t = a_{f,t} h_{t-1} + B_{f,t} (dt_{f,t} x_t)^T,   o_{f,t} = h_t^T C_{f,t}
    backward: the same over the reversed sequence with B_b, C_b, dt_b: o_{b,t} from tokens >= t
    y_t = o_{f,t-1} + o_{b,t+1} + (D + x_t W_D) * x_t       (per head: a data-dependent diagonal)
    out = RMSNorm(y * silu(z)) W_out

so the mixing matrix is M[t, s] = C_{f,t-1}^T (prod_{s<u<=t-1} a_{f,u}) B_{f,s} dt_{f,s} for s < t,
its mirror from the backward scan for s > t, and D + x_t W_D on the diagonal. Both directions
share the input projection's x, the convolution and the decay parameters; as Hydra does, the
reversed sequence is concatenated to the batch so that one `chunk_gla` call runs both scans.
The block follows the official Hydra module (goombalab/hydra): in_proj [z, xBC, dt] without bias,
conv1d of kernel 7 with padding 3 and a bias, RMSNormGated with the norm after the gate, fc_D.

Packed rows: segment_ids are reversed with the sequence, so the backward scan, like the forward
one, restarts at every segment boundary; padding neither reads nor changes either state; the
convolution sees only its own segment; and the shift takes a token's predecessor in its segment
(padding skipped), zero at a segment's first token. A packed row equals its documents alone.

Departures from the official code: the heads are the model's n_heads (or num_heads) rather than
inner / headdim; the gated norm's eps is the model's norm_eps (Hydra's is 1e-5); fc_D starts from
N(0, init_std^2) like every seqmix projection (PyTorch's Linear default there); dt is not clamped
(Hydra's default dt_limit is (0, inf) too) and the initial states are not learned.

Hydra is not causal: each output reads the tokens after it. It has no decode cache, and a model
holding it cannot generate; it trains with the masked-language-modelling objective.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.centred_conv import CentredConvolution
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.token_shift import previous_tokens, shift
from seqmix.mixers.recurrent import decay_parameters
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla

NOT_CAUSAL = ("{name} is not causal (each token reads the tokens after it): it has no decode cache, so a model "
              "holding it cannot decode or generate; train it with objective: mlm")


@dataclasses.dataclass
class HydraConfig:
    state_dim: int = 64  # N
    expand: int = 2  # inner channels I = expand * d_model
    conv_width: int = 7  # odd: the convolution is centred on each token
    num_heads: int | None = None  # H; None: the model's n_heads
    chunk_size: int = 64  # the chunked op's (a multiple of 16); changes the speed, never the result
    causal: ClassVar[bool] = False  # what the trainer checks: a non-causal model needs objective mlm

    def validate(self, path: str) -> None:
        for key in ("state_dim", "expand"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.conv_width >= 1 and self.conv_width % 2 == 1, path, "conv_width",
                f"must be odd (a window centred on the token), got {self.conv_width}")
        require(self.num_heads is None or self.num_heads >= 1, path, "num_heads",
                f"must be >= 1 or null, got {self.num_heads}")
        require(self.chunk_size >= 16 and self.chunk_size % 16 == 0, path, "chunk_size",
                f"must be a positive multiple of 16, got {self.chunk_size}")


@register_mixer("hydra", HydraConfig)
class Hydra(nnx.Module):
    """x [B, T, D] -> [B, T, D]; H heads of P = I / H channels, states [N, P] per head and direction."""

    def __init__(self, model_config, config: HydraConfig, *, rngs: nnx.Rngs):
        d_model = model_config.d_model
        heads = config.num_heads or model_config.n_heads
        inner = config.expand * d_model
        if inner % heads:
            raise ValueError(f"hydra: expand * d_model = {inner} is not divisible by {heads} heads")
        self.heads, self.inner, self.state_dim, self.chunk_size = heads, inner, config.state_dim, config.chunk_size
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        convolved = inner + 4 * config.state_dim  # x, B_f, C_f, B_b, C_b
        self.in_proj = projection(d_model, inner + convolved + 2 * heads, ("embed", "heads"), std=std, rngs=rngs)
        self.conv = CentredConvolution(convolved, config.conv_width, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs)
        self.D = nnx.Param(jnp.ones((heads,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
        self.fc_D = projection(inner, heads, ("heads", None), std=std, rngs=rngs)
        self.norm = RMSNorm(inner, eps=model_config.norm_eps)
        self.out_proj = projection(inner, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the scans are
        ordered). Returns (y [B, T, D] in x's dtype, None). A cache is refused: see `init_cache`."""
        if cache is not None:
            raise ValueError(NOT_CAUSAL.format(name="hydra"))
        del positions
        batch, length, _ = x.shape
        n = self.state_dim
        z, xbc, dt = jnp.split(self.in_proj(x), [self.inner, 2 * self.inner + 4 * n], axis=-1)
        values, b_f, c_f, b_b, c_b = jnp.split(self.conv(xbc, segment_ids=segment_ids),
                                               [self.inner + i * n for i in range(4)], axis=-1)
        # Row b of the doubled batch runs forward, row B + b the reversed row b.
        both = lambda forward, backward: jnp.concatenate([forward, jnp.flip(backward, axis=1)], axis=0)
        ids = None if segment_ids is None else both(segment_ids, segment_ids)
        dt = jax.nn.softplus(both(*jnp.split(dt.astype(jnp.float32), 2, axis=-1)) + self.dt_bias[...])  # [2B, T, H]
        heads = values.astype(jnp.float32).reshape(batch, length, self.heads, -1)
        one_group = lambda m: m.astype(jnp.float32)[:, :, None, :]  # [2B, T, 1, N]: every head reads it
        scan = functools.partial(chunk_gla, scale=1.0, chunk_size=self.chunk_size)
        out = scan(one_group(both(c_f, c_b)), one_group(both(b_f, b_b)), both(heads, heads) * dt[..., None],
                   log_a=-jnp.exp(self.A_log[...]) * dt, segment_ids=ids)
        out = shift(out, *previous_tokens(ids, 2 * batch, length)[:2])  # o_{t-1}: the diagonal left to D
        diagonal = self.D[...] + self.fc_D(values).astype(jnp.float32)  # [B, T, H]
        y = out[:batch] + jnp.flip(out[batch:], axis=1) + diagonal[..., None] * heads
        y = self.norm(y.reshape(batch, length, self.inner) * jax.nn.silu(z.astype(jnp.float32)))
        return self.out_proj(y.astype(x.dtype)), None

    def init_cache(self, batch: int, max_len: int, dtype):
        """Refused: a non-causal mixer has no decode cache (a model holding it cannot generate)."""
        del batch, max_len, dtype
        raise ValueError(NOT_CAUSAL.format(name="hydra"))
