"""Next-token cross-entropy over packed rows, from logits or, for large vocabularies, from the
final hidden states and the head in blocks of tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.models.lm import soft_capped


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of tokens it covers.

    logits [B, T, V] (any float dtype; the log-softmax is float32), targets [B, T] int,
    mask [B, T] bool (False for padding). Returns (sum of -log p(target), count), both float32
    scalars, so that micro-batches and devices can be summed before dividing once.
    """
    mask = mask.astype(jnp.float32)
    return -jnp.sum(target_log_probs(logits, targets) * mask), jnp.sum(mask)


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [B, T] float32 from logits [B, T, V] (any float dtype) and targets [B, T] int."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def chunked_cross_entropy_sum(features: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, *,
                              chunk_tokens: int, soft_cap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sum(soft_capped(features @ head, soft_cap), targets, mask)` without the
    [B, T, V] logits.

    features [B, T, D] (the model's `features`, in the compute dtype), head [D, V] (its
    `head_kernel()`, same dtype), targets [B, T] int, mask [B, T] bool. The positions are taken in
    blocks of ceil(chunk_tokens / B), every row at once, so that a block holds about chunk_tokens
    tokens and the rows stay split over the devices as the batch is (a block of the flattened
    batch would gather every device's tokens); each block's [B, span, V] logits live only inside
    its step of the scan, and the backward pass recomputes them (jax.checkpoint) instead of
    storing them, so memory holds one block's logits however long the rows (as in Cut
    Cross-Entropy / fused linear cross-entropy). Same value and gradients as the plain loss, up to
    float32 rounding.
    """
    batch, length = targets.shape
    span = -(-chunk_tokens // batch)
    blocks = -(-length // span)
    pad = blocks * span - length

    def blocked(x):  # [B, T, ...] -> [blocks, B, span, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, blocks, span, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def block_loss(head, x, target, weight):
        logits = soft_capped((x @ head).astype(jnp.float32), soft_cap)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weight)

    def accumulate(total, block):
        return total + block_loss(head, *block), None

    weights = mask.astype(jnp.float32)
    total, _ = jax.lax.scan(accumulate, jnp.float32(0.0),
                            (blocked(features), blocked(targets.astype(jnp.int32)), blocked(weights)))
    return total, jnp.sum(weights)
