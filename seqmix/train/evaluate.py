"""Held-out loss and perplexity."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding

def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays laid out by `sharding` (every key:
    inputs, targets, segment_ids, positions, and loss_mask where the pipeline made one)."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def held_out_loss(eval_step, state, batches, sharding: NamedSharding, max_batches: int) -> dict[str, float]:
    """Mean token cross-entropy (nats) and perplexity over up to `max_batches` batches (each
    given to eval_step with its index: an MLM run's fixed masking)."""
    total, count = 0.0, 0.0
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        loss_sum, tokens = eval_step(state, to_global(batch, sharding), index)
        total, count = total + float(loss_sum), count + float(tokens)
    if count == 0:
        raise ValueError("the held-out set produced no tokens to evaluate")
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": count}
