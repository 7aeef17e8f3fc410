"""Rotary position embeddings (RoPE), in the half-split layout of Llama/Hugging Face."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + D/2]) by angle position * theta^(-2i/D).

    x [B, T, H, D], positions [B, T] int -> [B, T, H, D] in x's dtype. Angles are computed in
    float32: positions reach 1e5+ and bfloat16 angles would lose the low-frequency channels.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
