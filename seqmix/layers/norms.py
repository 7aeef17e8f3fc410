"""Normalisation layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, statistics in float32: x / rms(x) * w (`weight`
    = w, initially 1, as in Llama), or with unit_offset x / rms(x) * (1 + w) (w initially 0, as in
    Gemma and Qwen3-Next). With `groups`, rms is taken over each of that many equal groups of
    channels apart (Mamba2's gated norm, one per group of B/C), w still spanning all D.

    x [..., D] any float dtype -> same shape and dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, unit_offset: bool = False, groups: int = 1):
        if dim % groups:
            raise ValueError(f"RMSNorm: {dim} channels do not split into {groups} groups")
        self.eps, self.unit_offset, self.groups = eps, unit_offset, groups
        initial = jnp.zeros if unit_offset else jnp.ones
        self.weight = nnx.Param(initial((dim,), jnp.float32), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, -1)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)).reshape(x.shape)
        scale = 1.0 + self.weight[...] if self.unit_offset else self.weight[...]
        return (normed * scale).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis, in float32 (eps inside the root keeps zero vectors finite)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)


class GroupNorm(nnx.Module):
    """Per-group layer norm over the last axis (RWKV-7's per-head output norm): x [..., C] in
    `groups` groups of C / groups channels, each normalised to zero mean and unit variance, then
    an affine `weight` (initially `scale`), `bias` [C]; statistics in float32; same shape and dtype out."""

    def __init__(self, channels: int, groups: int, *, eps: float = 1e-5, scale: float = 1.0):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nnx.Param(jnp.full((channels,), scale, jnp.float32), out_sharding=("norm",),
                                eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, -1)
        mean = jnp.mean(grouped, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(grouped - mean), axis=-1, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(variance + self.eps)).reshape(x.shape)
        return (normed * self.weight[...] + self.bias[...]).astype(x.dtype)
