"""Position-wise feed-forward blocks: the gated MLP of Llama-style models (SwiGLU, or GeGLU as in
Gemma) and the ungated MLP (Nemotron-H's squared-ReLU layers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.linear import projection
from seqmix.layers.partitioning import constrained

Activation = Literal["silu", "gelu_tanh", "relu2"]
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Primer's squared ReLU
}


def _hidden(h: jax.Array) -> jax.Array:
    """An MLP's hidden activations [B, T, F], pinned to (batch, length, mlp): the width split over
    the tensor axis, between the projections that are split the same way."""
    return constrained(h, "batch", "length", "mlp")


class GatedMLP(nnx.Module):
    """down_proj(act(gate_proj(x) * m_gate) * up_proj(x)) * m_down; x [B, T, D] -> [B, T, D] in x's
    dtype. act silu: SwiGLU (Llama); gelu_tanh: GeGLU (Gemma). The multipliers (m_gate, m_down),
    1 unless given, are Falcon-H1's muP `mlp_multipliers`; `bias` puts biases on all three."""

    def __init__(self, d_model: int, hidden: int, *, std: float, out_std: float, rngs: nnx.Rngs,
                 activation: Activation = "silu", bias: bool = False, multipliers: tuple[float, float] = (1.0, 1.0)):
        self.activation, self.multipliers = activation, tuple(multipliers)
        self.gate_proj = projection(d_model, hidden, ("embed", "mlp"), std=std, rngs=rngs, bias=bias)
        self.up_proj = projection(d_model, hidden, ("embed", "mlp"), std=std, rngs=rngs, bias=bias)
        self.down_proj = projection(hidden, d_model, ("mlp", "embed"), std=out_std, rngs=rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_multiplier, down_multiplier = self.multipliers
        gate = _hidden(self.gate_proj(x))
        if gate_multiplier != 1.0:
            gate = gate * gate_multiplier
        y = self.down_proj(ACTIVATIONS[self.activation](gate) * _hidden(self.up_proj(x)))
        return y if down_multiplier == 1.0 else y * down_multiplier


class MLP(nnx.Module):
    """down_proj(act(up_proj(x))); x [B, T, D] -> [B, T, D] in x's dtype (Nemotron-H: act relu2)."""

    def __init__(self, d_model: int, hidden: int, *, std: float, out_std: float, rngs: nnx.Rngs,
                 activation: Activation = "relu2", bias: bool = False):
        self.activation = activation
        self.up_proj = projection(d_model, hidden, ("embed", "mlp"), std=std, rngs=rngs, bias=bias)
        self.down_proj = projection(hidden, d_model, ("mlp", "embed"), std=out_std, rngs=rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.activation](_hidden(self.up_proj(x))))
