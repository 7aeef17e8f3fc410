"""How far generation agreement falls when a model is perturbed a little: the noise floor of
`seqmix eval --agreement`, against which a student's agreement with its teacher reads.

    python benchmarks/agreement_floor.py TEACHER      # a Hugging Face / seqmix export, e.g. linearize.py's teacher_hf

The model's greedy continuations (32 tokens) of 64 held-out prompts of 64 tokens (the embedded
corpus's held-out text, as `seqmix eval --agreement` draws them) are compared with those of the same
model with its weights rounded to bfloat16, and multiplied by (1 + s N(0, 1)) per weight for
s = 1e-3 and 1e-2. Prints a markdown table: the share of prompts continued identically and the mean
common prefix.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.models.hf import from_pretrained
from seqmix.train.agreement import agreement, greedy_continuations, held_out_prompts
from seqmix.train.config import DataConfig
from seqmix.train.inputs import held_out_tokens, load_corpus

PERTURBATIONS = {
    "weights rounded to bfloat16": lambda weight, key: weight.astype(jnp.bfloat16).astype(weight.dtype),
    "each weight times (1 + 1e-3 N(0, 1))": lambda weight, key: weight * (1 + 1e-3 * jax.random.normal(key, weight.shape)),
    "each weight times (1 + 1e-2 N(0, 1))": lambda weight, key: weight * (1 + 1e-2 * jax.random.normal(key, weight.shape)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory (Hugging Face or seqmix format)")
    args = parser.parse_args()

    model = from_pretrained(args.model)
    prompts = held_out_prompts(held_out_tokens(load_corpus(DataConfig(), training=False)), 64, 64)
    reference = greedy_continuations(model, prompts, 32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(weights))
    print("| model | agreement (32 identical) | common prefix |\n|---|---:|---:|")
    for name, perturb in PERTURBATIONS.items():
        perturbed = nnx.merge(graphdef, jax.tree.unflatten(tree, list(map(perturb, weights, keys))), rest)
        agreed = agreement(greedy_continuations(perturbed, prompts, 32), reference)
        print(f"| {name} | {100 * agreed.exact:.1f}% | {agreed.common_prefix:.1f} |", flush=True)


if __name__ == "__main__":
    main()
