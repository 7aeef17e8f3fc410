"""Generation over many prompts of varied lengths, as lm-eval's `generate_until` runs it: prompts
sorted longest first, `generate` on each batch. Timed with the prompts and caches padded to
`compiled_length` buckets (seqmix's `generate`) and, side by side, without (each batch at its own
longest prompt, as before 2026-12-04), counting the prefill and decode programs each compiles.

    python benchmarks/generation_compiles.py [--prompts 256] [--batch 8] [--new-tokens 16] [--rounds 2]

The model is a 2-layer GLA + attention hybrid (d_model 64, 256 ids) with random weights: the
prompts are random ids of 20 to 200 tokens. Each mode runs in its own process (no program compiled
by the other), the modes taking turns; both must produce the same tokens.
"""

import argparse
import hashlib
import io
import logging
import subprocess
import sys
import time


def run_mode(bucketed: bool, prompts: int, batch: int, new_tokens: int) -> None:
    """Runs one mode in this process and prints `wall prefill_compiles decode_compiles digest`."""
    import jax
    import numpy as np
    from flax import nnx

    import seqmix.models.generate as generation
    from seqmix.configuration import build
    from seqmix.models.config import ModelConfig
    from seqmix.models.lm import LanguageModel

    if not bucketed:
        generation.compiled_length = lambda length: length
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
                                 "layer_pattern": ["gla", "attention"]}, "model")
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    rows = sorted((rng.integers(0, 256, rng.integers(20, 201)) for _ in range(prompts)), key=len, reverse=True)
    log = io.StringIO()
    logging.getLogger("jax._src.interpreters.pxla").addHandler(logging.StreamHandler(log))
    start = time.perf_counter()
    with jax.log_compiles(True):
        tokens = np.concatenate([np.asarray(generation.generate(model, rows[i:i + batch], new_tokens,
                                                                rng=jax.random.key(0), temperature=0.0))
                                 for i in range(0, prompts, batch)])
    wall = time.perf_counter() - start
    text = log.getvalue()
    print(wall, text.count("Compiling jit(_prefill)"), text.count("Compiling jit(_decode)"),
          hashlib.sha1(tokens.tobytes()).hexdigest()[:12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=["bucketed", "unbucketed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        run_mode(args.mode == "bucketed", args.prompts, args.batch, args.new_tokens)
        return
    print(f"# generate over {args.prompts} prompts of 20-200 tokens, longest first, batches of {args.batch}, "
          f"{args.new_tokens} new tokens (2-layer GLA + attention, d_model 64)")
    print("| round | prompts and caches | wall s | prefill compiles | decode compiles |")
    print("|---:|---|---:|---:|---:|")
    walls, digests = {}, set()
    for round_index in range(1, args.rounds + 1):
        for mode in ("unbucketed", "bucketed"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--prompts", str(args.prompts),
                                  "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)],
                                 check=True, capture_output=True, text=True).stdout.split()
            wall, prefills, decodes, digest = float(out[0]), out[1], out[2], out[3]
            walls.setdefault(mode, []).append(wall)
            digests.add(digest)
            label = "padded to compiled_length" if mode == "bucketed" else "at each batch's longest prompt"
            print(f"| {round_index} | {label} | {wall:.1f} | {prefills} | {decodes} |")
    if len(digests) != 1:
        raise SystemExit("the two modes generated different tokens")
    print(f"bucketed faster by {min(walls['unbucketed']) / min(walls['bucketed']):.1f}x (best of {args.rounds}); "
          "both modes generated the same tokens")


if __name__ == "__main__":
    main()
