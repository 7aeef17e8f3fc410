"""Next-token cross-entropy over packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of tokens it covers.

    logits [B, T, V] (any float dtype; the log-softmax is float32), targets [B, T] int,
    mask [B, T] bool (False for padding). Returns (sum of -log p(target), count), both float32
    scalars, so that micro-batches and devices can be summed before dividing once.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_loss * mask), jnp.sum(mask)
