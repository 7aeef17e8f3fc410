"""The SwiGLU feed-forward block of Llama-style models."""

from __future__ import annotations

import jax
from flax import nnx

from seqmix.layers.linear import projection


class SwiGLU(nnx.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); x [B, T, D] -> [B, T, D], in x's dtype."""

    def __init__(self, d_model: int, hidden: int, *, std: float, out_std: float, rngs: nnx.Rngs):
        self.gate_proj = projection(d_model, hidden, ("embed", "mlp"), std=std, rngs=rngs)
        self.up_proj = projection(d_model, hidden, ("embed", "mlp"), std=std, rngs=rngs)
        self.down_proj = projection(hidden, d_model, ("mlp", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
