"""Non-causal depthwise convolution, centred on each token (Hydra's conv1d: kernel W = 2r + 1,
PyTorch padding r), packed-sequence aware.

    y_t = act( b + sum_{j=0}^{W-1} w_j * x_{t+j-r} ),   only over x_{t+j-r} in t's own segment

A token sees r neighbours on each side within its own document: never the end of the previous
document or the start of the next one in a packed row, and never padding (segment 0), so a packed
row gives each document what it gets alone (zero-padded at both ends). The filter is positional:
padding inside a window still takes its slot. There is no decode cache: a token's output depends
on tokens after it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.short_conv import depthwise_filter


class CentredConvolution(nnx.Module):
    """x [B, T, C] -> y [B, T, C] in x's dtype (sums in float32); weight [W, C] (W odd), bias [C]
    added before the activation (silu unless activation=False)."""

    def __init__(self, channels: int, width: int, *, activation: bool = True, bias: bool = True, rngs: nnx.Rngs):
        if width < 1 or width % 2 == 0:
            raise ValueError(f"CentredConvolution width must be odd and >= 1 (centred on the token), got {width}")
        self.width, self.activation = width, activation
        self.weight, bias_param = depthwise_filter(channels, width, bias=bias, rngs=rngs)
        self.bias = nnx.data(bias_param)

    def __call__(self, x, *, segment_ids=None):
        """segment_ids [B, T] int (0 = padding) or None (one segment per row). Returns y [B, T, C]."""
        length, reach = x.shape[1], self.width // 2
        padded = jnp.pad(x.astype(jnp.float32), [(0, 0), (reach, reach), (0, 0)])
        if segment_ids is not None:
            # Padding's id 0 never equals a real token's, and the row's ends are padded with it.
            padded_ids = jnp.pad(segment_ids, [(0, 0), (reach, reach)])
        weight = self.weight[...].astype(jnp.float32)
        acc = jnp.zeros(x.shape, jnp.float32)
        for j in range(self.width):
            neighbour = jax.lax.slice_in_dim(padded, j, j + length, axis=1)
            if segment_ids is not None:
                same = jax.lax.slice_in_dim(padded_ids, j, j + length, axis=1) == segment_ids
                neighbour = jnp.where(same[..., None], neighbour, 0.0)
            acc = acc + weight[j] * neighbour
        if self.bias is not None:
            acc = acc + self.bias[...]
        y = jax.nn.silu(acc) if self.activation else acc
        return y.astype(x.dtype)
