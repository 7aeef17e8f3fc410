"""Rotary position embeddings (RoPE), in the half-split layout of Llama/Hugging Face, with
Llama-3's frequency-dependent scaling for long contexts."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from seqmix.configuration import require


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3's RoPE scaling (Hugging Face `rope_type: llama3`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter
    than original_max_position_embeddings / high_freq_factor kept, the band between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self, path: str) -> None:
        require(self.factor > 0, path, "factor", f"must be positive, got {self.factor}")
        require(0 < self.low_freq_factor < self.high_freq_factor, path, "high_freq_factor",
                f"must exceed low_freq_factor > 0, got {self.low_freq_factor} and {self.high_freq_factor}")
        require(self.original_max_position_embeddings > 0, path, "original_max_position_embeddings",
                f"must be positive, got {self.original_max_position_embeddings}")


def rotary_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The angular frequencies [dim / 2] float32 of channel pairs: theta^(-2i/dim), then scaled."""
    half = dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    context = scaling.original_max_position_embeddings
    # 0 where the wavelength is long (stretch fully), 1 where it is short (keep), linear between.
    keep = jnp.clip((context / wavelength - scaling.low_freq_factor)
                    / (scaling.high_freq_factor - scaling.low_freq_factor), 0.0, 1.0)
    return (1 - keep) * inv_freq / scaling.factor + keep * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None,
                 rotary_dim: int | None = None) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + R/2]) of the first R = rotary_dim channels (all of
    them when None; partial RoPE, as Qwen3-Next's, leaves the rest as they are) by angle
    position * frequency_i, the frequencies those of an R-channel rotation.

    x [B, T, H, D], positions [B, T] int -> [B, T, H, D] in x's dtype. Angles are computed in
    float32: positions reach 1e5+ and bfloat16 angles would lose the low-frequency channels.
    """
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    if rotary_dim == 0:
        return x
    angles = positions.astype(jnp.float32)[:, :, None, None] * rotary_frequencies(rotary_dim, theta, scaling)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x[..., :rotary_dim].astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return rotated if rotary_dim == x.shape[-1] else jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def row_positions(positions: jax.Array | None, batch: int, length: int) -> jax.Array:
    """The positions a mixer rotates by: positions [B, T] int as given, else each token's index in
    its row, 0..T-1 (the model passes per-segment positions for packed rows, `models.lm`)."""
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
