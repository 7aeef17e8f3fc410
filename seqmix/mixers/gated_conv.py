"""Gated short convolution: the cheap token mixer that Zoology (Arora et al. 2023) places before
every sequence mixer of its MQAR models (its `BaseConv` with a short filter), an H3-style
shift-and-multiply, and the one that makes most of Liquid's LFM2 layers, which gates the filter's
input too.

    Zoology:  c_t = sum_{i<width} w_i * u_{t-i}   (depthwise, within t's segment),   u = x
              y_t = (c_t * (x_t W_g)) W_o
    LFM2 (`input_gate`): u = (x W_b) * (x W_v), the rest as above

LFM2's checkpoints fuse W_b, W_g, W_v into one `in_proj` (rows [B | C | x]); with `bias` every
projection and the filter have biases (its `conv_bias`). Decode keeps the last width - 1 values of
u. On its own the mixer sees only `width` tokens; in front of attention it hands each position its
predecessors, so one attention layer can match a query key against the token that preceded each
value instead of first learning a previous-token head from rotary phases.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.registry import register_mixer


@dataclasses.dataclass
class GatedConvConfig:
    width: int = 3  # filter taps, the current token included (Zoology's kernel_size, LFM2's conv_L_cache)
    input_gate: bool = False  # the filter reads (x W_b) * (x W_v), not x (LFM2)
    bias: bool = False  # biases on the projections and the filter (LFM2's conv_bias)

    def validate(self, path: str) -> None:
        require(self.width >= 1, path, "width", f"must be >= 1, got {self.width}")


@struct.dataclass
class GatedConvCache:
    """tail [B, width-1, D] (the last filter inputs, zeros before the first); lengths [B] int32
    (tokens seen per row). Its size does not depend on the number of tokens."""

    tail: jax.Array
    lengths: jax.Array


@register_mixer("gated_conv", GatedConvConfig)
class GatedConv(nnx.Module):
    """x [B, T, D] -> [B, T, D]: conv [width, D] (no activation), g_proj and o_proj [D, D], with
    input_gate b_proj and v_proj [D, D] too, and with bias a bias [D] on each of them."""

    def __init__(self, model_config, config: GatedConvConfig, *, rngs: nnx.Rngs):
        d_model = model_config.d_model
        out_std = model_config.init_std / (2 * model_config.n_layers) ** 0.5
        linear = functools.partial(projection, d_model, d_model, rngs=rngs, bias=config.bias)
        self.conv = ShortConvolution(d_model, config.width, activation=False, bias=config.bias, rngs=rngs)
        input_gate = lambda: linear(("embed", "heads"), std=model_config.init_std) if config.input_gate else None
        self.b_proj, self.v_proj = nnx.data(input_gate()), nnx.data(input_gate())  # a submodule or None
        self.g_proj = linear(("embed", "heads"), std=model_config.init_std)
        self.o_proj = linear(("heads", "embed"), std=out_std)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: GatedConvCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the filter is
        positional). Returns (y [B, T, D] in x's dtype, the updated cache or None)."""
        del positions
        u = x if self.b_proj is None else self.b_proj(x) * self.v_proj(x)
        mixed, tail = self.conv(u, segment_ids=segment_ids, tail=None if cache is None else cache.tail)
        y = self.o_proj(mixed * self.g_proj(x))
        if cache is None:
            return y, None
        return y, GatedConvCache(tail=tail, lengths=cache.lengths + x.shape[1])

    def init_cache(self, batch: int, max_len: int, dtype) -> GatedConvCache:
        del max_len
        return GatedConvCache(tail=self.conv.empty_tail(batch, dtype), lengths=jnp.zeros((batch,), jnp.int32))
