"""Masked language modelling on the Shakespeare corpus: Hydra against bidirectional attention, and
a causal transformer as the baseline that sees only the left context, on held-out masked-token loss.

    python benchmarks/mlm.py                  # 1500 steps each, configs/runs/shakespeare_mlm.yaml
    python benchmarks/mlm.py --steps 20       # a smoke run

Each model (configs/models/<name>.yaml, bytes plus a mask token) trains with `seqmix train`'s
trainer on the run config `configs/runs/shakespeare_mlm.yaml` (15% of the bytes masked, 8 x 256
tokens a step), all for the same number of steps, then is scored on the held-out documents with
the same fixed masks (nats per masked byte; the unigram baseline is the loss of knowing no
context). Prints one markdown table.
"""

import argparse
import pathlib
import tempfile
import time

import jax
from flax import nnx

from seqmix.train.config import load_train_config
from seqmix.train.trainer import Trainer

ROOT = pathlib.Path(__file__).parent.parent
RUN = ROOT / "configs" / "runs" / "shakespeare_mlm.yaml"
# name: (model config, overrides)
MODELS = {
    "hydra": ("hydra_small", []),
    "bidirectional attention": ("bidirectional_attention_small", []),
    "causal attention": ("transformer_small", ["model.vocab_size=257"]),  # the mask token's row
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args()

    print(f"Held-out masked-token loss on Shakespeare, {args.steps} steps each ({RUN.name}), jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}\n")
    print("| model | parameters | steps | held-out masked-token loss (nats) | seconds |")
    print("|---|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        model, overrides = MODELS[name]
        with tempfile.TemporaryDirectory() as out_dir:
            config = load_train_config(RUN, [
                f"model={ROOT / 'configs' / 'models' / model}.yaml", *overrides, f"steps={args.steps}",
                f"optim.warmup_steps={min(100, args.steps // 10)}", f"eval_every={args.steps}",
                f"eval_batches={args.eval_batches}", f"log_every={max(1, args.steps // 10)}",
                f"checkpoint.every_steps={args.steps}", f"out_dir={out_dir}"])
            start = time.perf_counter()
            trainer = Trainer(config)
            result = trainer.run()
            seconds = time.perf_counter() - start
        parameters = sum(x.size for x in jax.tree.leaves(nnx.state(trainer.train_state.model(), nnx.Param)))
        print(f"| {name} ({model}) | {parameters / 1e6:.2f}M | {result.step} | {result.eval_loss:.3f} | "
              f"{seconds:.0f} |", flush=True)
    print(f"\nunigram baseline (no context): {result.unigram_loss:.3f} nats per token")


if __name__ == "__main__":
    main()
