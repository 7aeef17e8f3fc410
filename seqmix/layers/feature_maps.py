"""Feature maps phi of linear attention: softmax(q k^T) is replaced by phi(q) phi(k)^T.

Each maps [B, T, H, d] to [B, T, H, d'] in float32: d' = d, except Hedgehog's 2d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FIXED = {
    "identity": lambda x: x,
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
}
POSITIVE = ("elu", "relu", "softmax", "hedgehog")  # maps whose scores phi(q).phi(k) are >= 0
NAMES = (*FIXED, "hedgehog")


class Hedgehog(nnx.Module):
    """Hedgehog's learnable map (Zhang et al. 2024): [softmax(x W_h), softmax(-x W_h)] over the
    head dim, a [d, d] matrix per head initialised to the identity, so that it starts as a spiky,
    positive map of x itself (the LoLCATs initialisation). `param_type` is the variable type of
    the matrices (LoLCATs: `TransferParam`, which attention transfer trains)."""

    def __init__(self, heads: int, dim: int, *, param_type: type[nnx.Param] = nnx.Param):
        self.weight = param_type(jnp.broadcast_to(jnp.eye(dim, dtype=jnp.float32), (heads, dim, dim)),
                                 out_sharding=("heads", None, None), eager_sharding=False)

    def __call__(self, x):
        projected = jnp.einsum("bthd,hde->bthe", x.astype(jnp.float32), self.weight[...])
        return jnp.concatenate([jax.nn.softmax(projected, axis=-1), jax.nn.softmax(-projected, axis=-1)], axis=-1)


def apply_fixed(name: str, x):
    """The parameter-free map `name` (a key of FIXED) of x, in float32."""
    return FIXED[name](x.astype(jnp.float32))
