"""Decode memory at length: the bytes of the caches `generate` allocates for one row of 1k, 8k and
64k tokens (prompt + generated), per Hugging Face family, beside Llama's.

    python benchmarks/decode_memory.py                    # benchmarks/hf_configs/*
    python benchmarks/decode_memory.py DIR [DIR ...]      # checkpoint directories (config.json is enough)

benchmarks/hf_configs/<model_type>/config.json is transformers 5.24's default configuration of
each model_type (`<Family>Config().save_pretrained`), which mostly has its reference checkpoint's
sizes (Llama: Llama-2-7B; recurrent_gemma: recurrentgemma-2b; qwen3_next: Qwen3-Next-80B-A3B),
but for two whose defaults are toy layouts: lfm2 (attention in every layer) takes LFM2-1.2B's 16
layers of width 2048 with attention in layers 2, 5, 8, 10, 12 and 14, and nemotron_h (4 layers)
the 52-layer hybrid_override_pattern of Nemotron-H-8B.
Nothing is allocated: the model and its caches are traced abstractly (`eval_shape`), the caches in
bfloat16 (recurrent states stay float32). A recurrent layer's cache (state, convolution tails) and
a windowed attention layer's ring have one size whatever the length; only global attention layers
grow, by the bytes per token of the last column.
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.models.hf.checkpoint import config_from_hf, _read_config
from seqmix.models.lm import LanguageModel

CONFIGS = Path(__file__).parent / "hf_configs"
LENGTHS = (1024, 8192, 65536)


def cache_bytes(model: LanguageModel, length: int) -> list[int]:
    """Bytes of each layer's decode cache for one row of `length` tokens (traced, not allocated)."""
    caches = jax.eval_shape(lambda: model.init_cache(1, length, jnp.bfloat16))
    return [sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) for cache in caches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="*", type=Path)
    args = parser.parse_args()
    directories = args.directories or sorted(CONFIGS.iterdir())
    print("| config | layers | of which grow (global attention) | "
          + " | ".join(f"cache at {n // 1024}k" for n in LENGTHS) + " | growth per token |")
    print("|---|---:|---:|" + "---:|" * (len(LENGTHS) + 1))
    for directory in directories:
        config = config_from_hf(_read_config(directory), str(directory / "config.json"))
        model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
        per_layer = {n: cache_bytes(model, n) for n in LENGTHS}
        growing = [i for i in range(config.n_layers) if per_layer[LENGTHS[0]][i] != per_layer[LENGTHS[-1]][i]]
        totals = [sum(per_layer[n]) for n in LENGTHS]
        per_token = (totals[-1] - totals[0]) / (LENGTHS[-1] - LENGTHS[0])
        print(f"| {directory.name} | {config.n_layers} | {len(growing)} | "
              + " | ".join(size(t) for t in totals) + f" | {per_token / 1024:,.1f} KiB |")


def size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:,.0f} B"


if __name__ == "__main__":
    main()
