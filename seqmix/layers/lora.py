"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen projection, their PiSSA initialisation,
and their merge back into it."""

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

    def take_principal_part(self) -> None:
        """PiSSA (Meng et al. 2024, "Principal Singular Values and Singular Vectors Adaptation"):
        the adapter takes the base kernel's top `rank` singular triplets and the base keeps the
        rest, so the layer computes what it did and training moves the principal directions.
        With W = U S V^T (float32 SVD of the kernel [in, out]) and s = alpha / rank:
        A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T, base kernel W - s A B."""
        kernel = self.base.kernel[...].astype(jnp.float32)
        rank = self.adapter.lora_a.shape[1]
        if rank > min(kernel.shape):
            raise ValueError(f"PiSSA: rank {rank} exceeds the kernel's smaller side {min(kernel.shape)}")
        u, singular, vt = jnp.linalg.svd(kernel, full_matrices=False)
        root = jnp.sqrt(singular[:rank] / self.scale)
        a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
        self.adapter.lora_a.set_value(a)
        self.adapter.lora_b.set_value(b)
        self.base.kernel.set_value((kernel - self.scale * (a @ b)).astype(self.base.kernel.dtype))

    def merged(self) -> nnx.Linear:
        """The base projection with the adapter folded into its kernel: W + (alpha / rank) A B."""
        update = self.scale * (self.adapter.lora_a[...] @ self.adapter.lora_b[...])
        linear = nnx.clone(self.base)
        linear.kernel.set_value(linear.kernel[...] + update.astype(linear.kernel.dtype))
        return linear
