"""Causal depthwise short convolution (the `ShortConvolution` in front of DeltaNet's and Mamba2's
q/k/v), packed-sequence aware, with a decode cache of its last inputs.

    y_t = act( sum_{i<width} w_i * x_{t-i} ),   only over x_{t-i} in t's own segment

A token never sees the tail of the previous document in a packed row, and padding (segment 0)
contributes zeros: those are the boundary bugs the design notes list for short convolutions. The
filter is positional: padding inside a window still takes its slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def depthwise_filter(channels: int, width: int, *, bias: bool, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param | None]:
    """A depthwise convolution's parameters: weight [width, channels] ~ U(+-width^-1/2) (PyTorch's
    Conv1d init: a depthwise filter's fan-in is its width) and bias [channels] zeros, or None."""
    bound = width ** -0.5
    weight = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound),
                       out_sharding=("conv_width", "heads"), eager_sharding=False)
    bias_param = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("heads",), eager_sharding=False)
    return weight, bias_param if bias else None


class ShortConvolution(nnx.Module):
    """x [B, T, C] -> y [B, T, C] in x's dtype (sums in float32); weight [width, C], and with
    `bias` a bias [C] added before the activation (Mamba2's conv_bias, RecurrentGemma's conv).

    `tail` carries the previous `width - 1` inputs of each row [B, width-1, C] across calls
    (prefill, then decode steps); zeros mean "nothing before". The returned tail holds the last
    `width - 1` inputs seen, padding stored as zeros, so batched prompts are padded on the left.
    """

    def __init__(self, channels: int, width: int, *, activation: bool = True, bias: bool = False, rngs: nnx.Rngs):
        if width < 1:
            raise ValueError(f"ShortConvolution width must be >= 1, got {width}")
        self.width = width
        self.activation = activation
        self.weight, bias_param = depthwise_filter(channels, width, bias=bias, rngs=rngs)
        self.bias = nnx.data(bias_param)

    def empty_tail(self, batch: int, dtype) -> jax.Array:
        """The tail of rows with nothing before them: zeros [B, width-1, C]."""
        return jnp.zeros((batch, self.width - 1, self.weight.shape[1]), dtype)

    def __call__(self, x, *, segment_ids=None, tail=None):
        """segment_ids [B, T] int (0 = padding) or None; tail [B, width-1, C] or None.
        Returns (y [B, T, C], new tail [B, width-1, C] in x's dtype)."""
        batch, length, channels = x.shape
        if segment_ids is not None:
            x = jnp.where(segment_ids[..., None] != 0, x, 0)
        history = self.width - 1
        if tail is None:
            tail = self.empty_tail(batch, x.dtype)
        seen = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, history + T, C]
        if segment_ids is not None:
            # The cached tail continues the segment of the call's first token.
            seen_segments = jnp.concatenate([jnp.repeat(segment_ids[:, :1], history, axis=1), segment_ids], axis=1)
        weight = self.weight[...].astype(jnp.float32)
        acc = jnp.zeros((batch, length, channels), jnp.float32)
        for offset in range(self.width):
            shifted = jax.lax.slice_in_dim(seen, history - offset, history - offset + length, axis=1)
            shifted = shifted.astype(jnp.float32)
            if segment_ids is not None:
                same = jax.lax.slice_in_dim(seen_segments, history - offset, history - offset + length, axis=1)
                shifted = jnp.where((same == segment_ids)[..., None], shifted, 0.0)
            acc = acc + weight[offset] * shifted
        if self.bias is not None:
            acc = acc + self.bias[...]
        y = jax.nn.silu(acc) if self.activation else acc
        return y.astype(x.dtype), seen[:, length:]

