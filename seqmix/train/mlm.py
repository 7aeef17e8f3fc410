"""The masked-language-modelling objective (`objective: mlm`, BERT's): a bidirectional model reads
each row with a random share of its real tokens replaced by a mask token and is scored on
predicting the originals at those positions alone.

The pipeline's rows are next-token pairs; MLM reads their `inputs`, the unshifted tokens. Every
masked position gets the mask token (not BERT's 80% mask / 10% random / 10% unchanged): the
held-out loss is then exactly the loss of filling in a mask, comparable across models. Each real
token is masked independently with probability `rate`, drawn with `jax.random` inside the jitted
step, from a key folded from the run's seed and the optimizer's step count (part of the
checkpointed state, so a resumed run masks exactly as an uninterrupted one); held-out batch i is
masked from a fixed key and i, the same for every run and model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EVAL_MASKING_SEED = 0x5EED  # held-out masks: the same for every run, whatever its seed


def masked_for_mlm(batch: dict[str, jax.Array], key: jax.Array, *, rate: float,
                   mask_token: int) -> dict[str, jax.Array]:
    """The MLM form of a batch of next-token rows.

    batch: int32 arrays [..., B, T] (inputs, targets, segment_ids, positions, loss_mask). Returns
    the batch with inputs: the tokens, each real one (segment id != 0) replaced by `mask_token`
    with probability `rate`; targets: the original tokens; loss_mask: 1 exactly at the masked
    positions (so the loss covers them alone); segment_ids and positions unchanged.
    """
    tokens = batch["inputs"]
    masked = jax.random.bernoulli(key, rate, tokens.shape) & (batch["segment_ids"] != 0)
    return {**batch, "inputs": jnp.where(masked, jnp.asarray(mask_token, tokens.dtype), tokens), "targets": tokens,
            "loss_mask": masked.astype(tokens.dtype)}


def training_key(seed: int, step: jax.Array) -> jax.Array:
    """The masking key of optimizer step `step` (a traced count) of a run seeded `seed`."""
    return jax.random.fold_in(jax.random.key(seed), step)


def held_out_key(index: jax.Array) -> jax.Array:
    """The masking key of held-out batch `index` (the same in every run)."""
    return jax.random.fold_in(jax.random.key(EVAL_MASKING_SEED), index)
