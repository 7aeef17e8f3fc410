"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen projection, and their merge back into it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRALinear(nnx.Module):
    """y = base(x) + (alpha / rank) * x A B, with A [in, rank] and B [rank, out] `nnx.LoRAParam`s
    (B starts at zero, so the adapted layer starts as the base). The base keeps its `nnx.Param`s:
    an optimizer over `wrt=nnx.LoRAParam` trains the adapter alone."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.adapter = nnx.LoRA(base.in_features, rank, base.out_features, param_dtype=jnp.float32, rngs=rngs)
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + (self.scale * self.adapter(x)).astype(x.dtype)

    def merged(self) -> nnx.Linear:
        """The base projection with the adapter folded into its kernel: W + (alpha / rank) A B."""
        update = self.scale * (self.adapter.lora_a[...] @ self.adapter.lora_b[...])
        linear = nnx.clone(self.base)
        linear.kernel.set_value(linear.kernel[...] + update.astype(linear.kernel.dtype))
        return linear
