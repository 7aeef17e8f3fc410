"""Feature maps phi of linear attention: softmax(q k^T) is replaced by phi(q) phi(k)^T.

Each maps [B, T, H, d] to [B, T, H, d'] in float32: d' = d, except Hedgehog's and NaLaFormer's 2d.
NaLaFormer's map differs between queries and keys (`QUERY_KEY`).
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


def _power(x, exponent):
    """x ** exponent for x >= 0, with zero value and gradients (also the exponent's) where x = 0."""
    positive = x > 0
    return jnp.where(positive, jnp.where(positive, x, 1.0) ** exponent, 0.0)


NORM_AWARE_POWER = 3.0  # NaLaFormer's lambda: query powers span lambda * [1/2, 3/2]; keys are cubed


def norm_aware_query(q):
    """NaLaFormer's query map: the direction's positive and negative parts, each raised to a power
    that grows with the query norm, p = lambda (1/2 + tanh ||q||):
        phi_q(q) = [relu(q / ||q||) ** p, relu(-q / ||q||) ** p]      [..., d] -> [..., 2d]
    A long query gets a larger power, hence spikier scores (lower entropy), as softmax gives it."""
    q = q.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=-1, keepdims=True) + 1e-6)
    direction, power = q / norm, NORM_AWARE_POWER * (0.5 + jnp.tanh(norm))
    return jnp.concatenate([_power(jax.nn.relu(direction), power), _power(jax.nn.relu(-direction), power)], axis=-1)


def norm_aware_key(k):
    """NaLaFormer's key map: the positive and negative parts of k ** 3 (a fixed, norm-keeping power):
        phi_k(k) = [relu(k) ** 3, relu(-k) ** 3]      [..., d] -> [..., 2d]
    phi_q(q).phi_k(k) pairs only dimensions where q and k agree in sign: opposite directions are
    inhibited to 0 rather than made negative, and the scores stay >= 0 without discarding half of
    each vector (the negative parts keep their own half of the features)."""
    k = k.astype(jnp.float32)
    return jnp.concatenate([jax.nn.relu(k) ** 3, jax.nn.relu(-k) ** 3], axis=-1)


QUERY_KEY = {"nalaformer": (norm_aware_query, norm_aware_key)}  # (query map, key map)
POSITIVE = ("elu", "relu", "softmax", "hedgehog", "nalaformer")  # maps whose scores phi(q).phi(k) are >= 0
DOUBLING = ("hedgehog", "nalaformer")  # maps to 2d features
NAMES = (*FIXED, *QUERY_KEY, "hedgehog")


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


def apply_fixed(name: str, x, *, key: bool = False):
    """The parameter-free map `name` (a key of FIXED or QUERY_KEY) of x, in float32: for a map of
    QUERY_KEY, its query side, or its key side when `key`."""
    if name in QUERY_KEY:
        return QUERY_KEY[name][int(key)](x)
    return FIXED[name](x.astype(jnp.float32))
