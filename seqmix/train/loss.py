"""Next-token cross-entropy over packed rows, from logits or, for large vocabularies, from the
final hidden states and the head in blocks of tokens (`token_blocks`, which distillation's KL
shares)."""

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
    blocks (`token_blocks`); each block's [B, span, V] logits live only inside its step of the
    scan, and the backward pass recomputes them (jax.checkpoint) instead of storing them, so
    memory holds one block's logits however long the rows (as in Cut Cross-Entropy / fused linear
    cross-entropy). Same value and gradients as the plain loss, up to float32 rounding.
    """

    @jax.checkpoint
    def block_loss(head, x, target, weight):
        logits = soft_capped((x @ head).astype(jnp.float32), soft_cap)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weight)

    def accumulate(total, block):
        return total + block_loss(head, *block), None

    weights = mask.astype(jnp.float32)
    total, _ = jax.lax.scan(accumulate, jnp.float32(0.0),
                            token_blocks(chunk_tokens, features, targets.astype(jnp.int32), weights))
    return total, jnp.sum(weights)


def token_blocks(chunk_tokens: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each of `arrays` [B, T, ...] (one B and T) as [blocks, B, span, ...]: positions in blocks of
    span = ceil(chunk_tokens / B), every row at once (about chunk_tokens tokens a block, the rows
    still split over the devices as the batch is), the last block zero-padded. What a loss scans
    over to hold one block's [B, span, vocab] logits at a time."""
    batch, length = arrays[0].shape[:2]
    span = -(-chunk_tokens // batch)
    blocks = -(-length // span)

    def blocked(x):
        x = jnp.pad(x, [(0, 0), (0, blocks * span - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, blocks, span, *x.shape[2:]), 1, 0)

    return tuple(blocked(x) for x in arrays)
