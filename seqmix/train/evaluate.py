"""Held-out loss and perplexity, and the KL from a reference model (a linearized student's teacher)."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from seqmix.layers.partitioning import using_rules
from seqmix.models.lm import LanguageModel
from seqmix.train.distillation import model_kl_sum
from seqmix.train.inputs import Corpus, eval_iterator
from seqmix.train.run_loader import LoadedRun
from seqmix.train.sharding import batch_sharding
from seqmix.train.step import make_model_eval_step

def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays laid out by `sharding` (every key:
    inputs, targets, segment_ids, positions, and loss_mask where the pipeline made one)."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def _per_token(sums, batches, max_batches: int) -> tuple[float, float]:
    """(mean per token, tokens) of `sums(index, batch) -> (sum over its tokens, tokens)` over up to
    `max_batches` batches."""
    total, count = 0.0, 0.0
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        batch_sum, tokens = sums(index, batch)
        total, count = total + float(batch_sum), count + float(tokens)
    if count == 0:
        raise ValueError("the held-out set produced no tokens to evaluate")
    return total / count, count


def held_out_loss(eval_step, state, batches, sharding: NamedSharding, max_batches: int) -> dict[str, float]:
    """Mean token cross-entropy (nats) and perplexity over up to `max_batches` batches (each
    given to eval_step with its index: an MLM run's fixed masking)."""
    loss, count = _per_token(lambda index, batch: eval_step(state, to_global(batch, sharding), index), batches,
                             max_batches)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": count}


def run_held_out_loss(run: LoadedRun, corpus: Corpus) -> dict[str, float]:
    """`held_out_loss` of a loaded run's model (`run_loader.open_run`) over the first
    eval_batches batches of `corpus`'s held-out documents, computed as the trainer's evaluation
    computes them (its compute dtype, loss blocks, MLM masking and axis rules)."""
    config, (graphdef, state) = run.config, nnx.split(run.model)
    mlm = config.mlm if config.objective == "mlm" else None
    with using_rules(config.mesh.rules):  # the step traced under the run's rules, as in training
        step = make_model_eval_step(graphdef, jax.tree.map(lambda x: x.sharding, state), run.mesh,
                                    config.compute_dtype, config.loss_chunk_tokens, mlm)
        return held_out_loss(step, state, eval_iterator(config.data, corpus), batch_sharding(run.mesh),
                             config.eval_batches)


def held_out_kl(model: LanguageModel, reference: LanguageModel, batches, max_batches: int) -> dict[str, float]:
    """{"kl": mean KL(p_reference || p_model) of the next-token distributions, nats per real token;
    "tokens": how many} over up to `max_batches` held-out batches (dicts of [B, T] "inputs",
    "segment_ids", "positions"). Where held-out loss says how well each model predicts the text,
    this says how closely the model predicts as the reference does: 0 for the reference itself."""
    kl, count = _per_token(lambda _, batch: model_kl_sum(model, reference, batch), batches, max_batches)
    return {"kl": kl, "tokens": count}
