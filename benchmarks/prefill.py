"""Prefill of one long prompt, as `generate` runs it: in one call, or in pieces of
`generate.PREFILL_CHUNK` tokens (one compiled step scanned over the prompt, the cache carried).
Per model and prompt length: the compiled prefill's temporary bytes (XLA's count) and its time
(best of 3 rounds of 3-call medians, the two taking turns), with a cache 64 tokens longer than the
prompt, float32.

    python benchmarks/prefill.py [--models transformer_small hybrid_small] [--lengths 2048 8192]
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx
from kernels import measure

from seqmix.configuration import build, load_yaml
from seqmix.models import generate
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel

CONFIGS = pathlib.Path(__file__).parent.parent / "configs" / "models"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["transformer_small", "hybrid_small"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    args = parser.parse_args()
    chunk = generate.PREFILL_CHUNK
    print(f"prefill of one prompt, float32, pieces of {chunk} tokens, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}\n")
    print("| model | prompt | one call temp MiB | pieces temp MiB | one call ms | pieces ms | pieces / one call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        config = build(ModelConfig, load_yaml(CONFIGS / f"{name}.yaml"), name)
        model = LanguageModel(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        for length in args.lengths:
            tokens = jax.random.randint(jax.random.key(length), (1, length), 0, config.vocab_size)
            segment_ids = jnp.ones((1, length), jnp.int32)
            compiled = {piece: generate._prefill.lower(graphdef, state, tokens, segment_ids, length + 64, jnp.float32,
                                                       piece).compile() for piece in (length, chunk)}
            temp = {piece: c.memory_analysis().temp_size_in_bytes / 2**20 for piece, c in compiled.items()}
            seconds = measure({"one": compiled[length], "pieces": compiled[chunk]}, (state, tokens, segment_ids),
                              rounds=3, repeats=3)
            print(f"| {name} | {length} | {temp[length]:,.1f} | {temp[chunk]:,.1f} | {1e3 * seconds['one']:,.0f} | "
                  f"{1e3 * seconds['pieces']:,.0f} | {seconds['pieces'] / seconds['one']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
