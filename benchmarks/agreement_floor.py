"""How close to its teacher a model must be for `seqmix eval --agreement` to call it the same
generator: the teacher perturbed by growing weight noise, and students, each placed by how far its
next-token distributions are from the teacher's and by how often it continues prompts as the
teacher does.

    python benchmarks/agreement_floor.py TEACHER [--runs RUN ...]   # TEACHER: e.g. linearize.py's teacher_hf

The teacher's greedy continuations (32 tokens) of 64 held-out prompts of 64 tokens (the embedded
corpus's held-out text, as `seqmix eval --agreement` draws them) are compared with those of the same
model with its weights rounded to bfloat16, or multiplied by (1 + s N(0, 1)) per weight for growing
s, and with those of each run given (a student's run directory). Closeness is measured under
teacher forcing on 16 held-out rows of 256 tokens: KL(teacher || model) per token and the share of
tokens whose most likely next token is the teacher's. Prints a markdown table.
"""

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.models.hf import from_pretrained
from seqmix.train.agreement import agreement, greedy_continuations, held_out_prompts
from seqmix.train.config import DataConfig
from seqmix.train.distillation import kl_sum
from seqmix.train.inputs import held_out_tokens, load_corpus
from seqmix.train.run_loader import open_run

NOISE_SCALES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def perturbed_models(model):
    """(name, model) of the teacher perturbed: rounded to bfloat16, then relative noise of each scale."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(weights))
    rounded = [weight.astype(jnp.bfloat16).astype(weight.dtype) for weight in weights]
    yield "teacher, weights rounded to bfloat16", nnx.merge(graphdef, jax.tree.unflatten(tree, rounded), rest)
    for scale in NOISE_SCALES:
        noisy = [weight * (1 + scale * jax.random.normal(key, weight.shape)) for weight, key in zip(weights, keys)]
        yield f"teacher, each weight times (1 + {scale:g} N(0, 1))", nnx.merge(
            graphdef, jax.tree.unflatten(tree, noisy), rest)


def closeness(model, teacher_logits: jax.Array, rows: jax.Array) -> tuple[float, float]:
    """(KL(teacher || model) per token, share of tokens whose argmax is the teacher's) on rows [N, T]."""
    logits = jax.jit(lambda tokens: model(tokens))(rows)
    total, count = kl_sum(logits, teacher_logits, jnp.ones(rows.shape, bool))
    same = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
    return float(total / count), float(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="a model directory (Hugging Face or seqmix format)")
    parser.add_argument("--runs", nargs="*", default=[], help="students' run directories, judged against the teacher")
    args = parser.parse_args()

    teacher = from_pretrained(args.teacher)
    text = held_out_tokens(load_corpus(DataConfig(), training=False))
    prompts = held_out_prompts(text, 64, 64)
    rows = jnp.asarray(np.stack([text[start:start + 256] for start in np.linspace(0, len(text) - 256, 16).astype(int)]))
    teacher_logits = jax.jit(lambda tokens: teacher(tokens))(rows)
    reference = greedy_continuations(teacher, prompts, 32)
    # one model at a time: each perturbed copy or student is built when its row is measured
    models = itertools.chain(perturbed_models(teacher), ((run, open_run(run).model) for run in args.runs))
    print("| model | KL to the teacher (nats/token) | same next token | agreement (32 identical) | common prefix |\n"
          "|---|---:|---:|---:|---:|")
    for name, model in models:
        kl, same = closeness(model, teacher_logits, rows)
        agreed = agreement(greedy_continuations(model, prompts, 32), reference)
        print(f"| {name} | {kl:.2e} | {100 * same:.2f}% | {100 * agreed.exact:.1f}% | {agreed.common_prefix:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
