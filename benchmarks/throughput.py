"""Training throughput and memory of small models against a transformer of the same sizes.

    python benchmarks/throughput.py                          # T = 512 .. 8192
    python benchmarks/throughput.py --lengths 256 --tokens 2048
    python benchmarks/throughput.py --models transformer_small mamba_small s4d_small --lengths 512 2048
    python benchmarks/throughput.py --models hybrid_small --remat   # each model also rematerialised

The models are configs/models/*_small.yaml (d_model 128, 4 layers, byte vocabulary; any of them by
name with --models, the first the baseline of the ratios). Each step
trains on `--tokens` tokens (batch = tokens / T, at least 1 row) with the trainer's own step
(benchmarks/training.py: AdamW, the finite-step guard). Per model and T the
table gives training tokens/s (the best of 3 rounds, each the median of 3 steps, the models
taking turns) and the peak memory of the compiled step (arguments + temporaries + outputs not
aliased to the donated arguments, from XLA's buffer assignment), each also as a ratio to the
transformer's in the same run. hydra_small, a bidirectional encoder, is timed on the same step
(its objective would be masked tokens; the work per step is the same). With --remat every model
is timed a second time with its blocks rematerialised (the run option `remat`), in a row of its
own ("+ remat") beside the plain one.
"""

import argparse
import pathlib

import jax
import numpy as np

from seqmix.configuration import build, load_yaml
from seqmix.models.config import ModelConfig
from kernels import measure
from training import as_batch, stock_training

CONFIGS = pathlib.Path(__file__).parent.parent / "configs" / "models"
MODELS = ["transformer_small", "gla_small", "gated_deltanet_small", "mamba2_small", "hybrid_small"]


def lowered_step(name: str, length: int, tokens: int, remat: bool = False):
    """(the trainer's step of configs/models/<name>.yaml, its blocks rematerialised with `remat`,
    lowered for a batch of max(1, tokens // length) random rows of `length` tokens, the train
    state, the batch, its rows)."""
    config = build(ModelConfig, load_yaml(CONFIGS / f"{name}.yaml"), name)
    step, train_state = stock_training(config, steps=1_000_000, lr=1e-3, warmup_steps=0, remat=remat)
    batch = max(1, tokens // length)
    inputs = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length + 1), dtype=np.int32)
    batch_arrays = as_batch(inputs[:, :-1], inputs[:, 1:], np.ones((batch, length), bool))
    return step.lower(train_state.state, batch_arrays, None), train_state, batch_arrays, batch


def compiled_step(name: str, length: int, tokens: int, remat: bool = False):
    """(run: a zero-argument function doing one training step, peak bytes) for a model."""
    lowered, train_state, batch_arrays, batch = lowered_step(name, length, tokens, remat)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
    state = [train_state.state]

    def run():
        state[0], metrics = compiled(state[0], batch_arrays, None)
        return metrics["loss"]

    return run, peak, batch * length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per training step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--remat", action="store_true", help="time each model rematerialised too")
    args = parser.parse_args()
    variants = [(name, False) for name in args.models] + [(name, True) for name in args.models if args.remat]
    label = lambda name, remat: f"{name} + remat" if remat else name

    print(f"Training throughput, {args.tokens} tokens per step, AdamW, float32, jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}\n")
    base = args.models[0]
    print(f"| model | T | batch | tokens/s | x {base} | peak MiB | x {base} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        steps = {label(name, remat): compiled_step(name, length, args.tokens, remat) for name, remat in variants}
        seconds = measure({name: run for name, (run, _, _) in steps.items()}, (), rounds=args.rounds, repeats=3)
        for name, (_, peak, step_tokens) in steps.items():
            speed, base_speed = step_tokens / seconds[name], steps[base][2] / seconds[base]
            print(f"| {name} | {length} | {step_tokens // length} | {speed:,.0f} | {speed / base_speed:.2f} | "
                  f"{peak / 2**20:,.0f} | {peak / steps[base][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
