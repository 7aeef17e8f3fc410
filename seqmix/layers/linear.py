"""Bias-free projections with logical axis names, stored float32 and applied in the input's dtype."""

from __future__ import annotations

import jax
from flax import nnx

from seqmix.layers.partitioning import logical


def projection(in_dim: int, out_dim: int, axes: tuple[str, str], *, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear(in_dim -> out_dim), kernel [in_dim, out_dim] ~ N(0, std^2) named `axes`.

    `dtype=None` lets the layer compute in the dtype of its input, so a bfloat16 activation
    gives a bfloat16 matmul while the float32 master weight stays untouched.
    """
    return nnx.Linear(
        in_dim, out_dim, use_bias=False, dtype=None, param_dtype=jax.numpy.float32,
        kernel_init=logical(nnx.initializers.normal(std), *axes), rngs=rngs,
    )
