"""Projections (bias-free unless asked) with logical axis names, stored float32 and applied in the input's dtype."""

from __future__ import annotations

import jax
from flax import nnx

from seqmix.layers.partitioning import logical


def projection(in_dim: int, out_dim: int, axes: tuple[str, str], *, std: float, rngs: nnx.Rngs,
               bias: bool = False) -> nnx.Linear:
    """nnx.Linear(in_dim -> out_dim), kernel [in_dim, out_dim] ~ N(0, std^2) named `axes`; with
    `bias`, a bias [out_dim] initialised to zeros (Qwen2's q/k/v projections have one).

    `dtype=None` lets the layer compute in the dtype of its input, so a bfloat16 activation
    gives a bfloat16 matmul while the float32 master weight stays untouched.
    """
    return nnx.Linear(
        in_dim, out_dim, use_bias=bias, dtype=None, param_dtype=jax.numpy.float32,
        kernel_init=logical(nnx.initializers.normal(std), *axes),
        bias_init=logical(nnx.initializers.zeros_init(), axes[1]), rngs=rngs,
    )
