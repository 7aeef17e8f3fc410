"""Grouped value heads: more value heads than query/key heads (Qwen3-Next's Gated DeltaNet: 16
q/k heads, 32 v heads).

q and k have Hk heads; v, the per-token gates and betas, the state and the output have
Hv = G * Hk heads, and value head j reads query/key head j // G (the order of transformers'
`repeat_interleave`). The token-by-token references and the `xla` paths repeat q and k to Hv heads
(JAX sums the repeated copies' gradients back); the Pallas kernels index the shared head instead.
"""

import jax.numpy as jnp


def group_size(query_heads: int, value_heads: int) -> int:
    """G = Hv / Hk (the op's checks make it whole)."""
    return value_heads // query_heads


def repeat_to_value_heads(x, value_heads: int):
    """[..., Hk, D] with heads on axis -2 -> [..., Hv, D], value head j holding head j // G."""
    groups = group_size(x.shape[-2], value_heads)
    return x if groups == 1 else jnp.repeat(x, groups, axis=-2)
