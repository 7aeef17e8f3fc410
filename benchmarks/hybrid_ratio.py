"""Held-out loss and MQAR recall of hybrids against their ratio of linear to full-attention layers.

    python benchmarks/hybrid_ratio.py                  # 3 mixers x 4 ratios: about an hour on 2 CPU cores
    python benchmarks/hybrid_ratio.py --mixers gla kda --ratios 0:1 3:1 1:0 --lm-steps 1000
    python benchmarks/hybrid_ratio.py --depth 7 --ratios 0:1 6:1 1:0   # the paper's 6:1 exactly

The study of "A Systematic Analysis of Hybrid Linear Attention" (Wang et al. 2025, arXiv 2507.06457):
for each linear mixer, hybrids with a:b layers (a linear layers then b attention layers, repeated to
fill `--depth`) from all attention (0:1) to all linear (1:0), every model of one shape (d_model,
depth, heads, MLP width): the same steps, batches and optimizer. At the default depth of 8 the
paper's 6:1 becomes 7:1, the closest ratio that fills the depth. Parameter counts are equal but for
the mixers themselves (at d_model 64, a GLA layer holds about attention's 4 d_model^2 weights and a
Mamba-2 layer, with its inner width of 2 d_model, more): the table prints every model's. The
all-attention model is trained once and shared by every line.
The defaults (8 layers of width 64; 200 steps of 8 x 256 bytes; MQAR 4x64, 300 steps of 32 rows)
were sized from CPU times measured at this shape with larger batches (about 100 s to compile a
model's four programs; scaled to the default batches, 0.4-0.75 s per language-model step and
0.45-0.8 s per MQAR step): 5-8 minutes per model, about an hour for the default sweep's 10 models
on 2 cores (an estimate: the whole sweep was not run). Short runs, which rank the ratios early in
training; raise the steps for firmer figures.

Each model is scored twice, each time trained from scratch (seed `--seed`):
- held-out loss: `--lm-steps` steps of the trainer's own step (benchmarks/training.py: AdamW) on the embedded Shakespeare
  corpus through the trainer's pipeline (byte tokens, one piece of `--seq-len` per row), then the
  mean cross-entropy (nats per byte) over the first `--eval-batches` batches of the held-out text;
- MQAR recall: recall.py's `train_and_score` (its vocabulary, initialisation and schedule) on one of
  its settings for `--recall-steps` steps, at this study's model shape.
Prints a markdown table and writes a plot of both against the share of linear layers (`--plot`).
"""

import argparse
import itertools
import pathlib
import time

import jax
from flax import nnx

from recall import SETTINGS, train_and_score
from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.compile_check import parameter_counts
from seqmix.train.config import DataConfig
from seqmix.train.inputs import eval_iterator, load_corpus, train_iterator
from seqmix.train.loss import cross_entropy_sum
from training import stock_training

VOCAB = 256  # the byte tokenizer's
CACHE = pathlib.Path(__file__).parent.parent / ".cache" / "seqmix"  # the trainer's, wherever this runs from


def ratio_pattern(ratio: str, mixer: str) -> list[str]:
    """The layer pattern of ratio "a:b": a `mixer` layers then b attention layers."""
    linear, full = (int(part) for part in ratio.split(":"))
    return [mixer] * linear + ["attention"] * full


def linear_share(ratio: str) -> float:
    linear, full = (int(part) for part in ratio.split(":"))
    return linear / (linear + full)


def held_out_loss(options: dict, data: DataConfig, corpus, *, steps: int, lr: float, eval_batches: int,
                  seed: int) -> float:
    """Mean held-out cross-entropy (nats per token) after `steps` training steps on the training text."""
    config = build(ModelConfig, {"vocab_size": VOCAB, **options}, "model")
    step, train_state = stock_training(config, steps=steps, lr=lr, warmup_steps=steps // 10, seed=seed)
    batches = train_iterator(data, corpus, seed)
    for _ in range(steps):
        # The pipeline's batch as the trainer hands it over: one micro-batch.
        train_state.state, _ = step(train_state.state, {name: array[None] for name, array in next(batches).items()},
                                    None)
    model = train_state.model()
    summed = nnx.jit(lambda model, inputs, targets, scored: cross_entropy_sum(model(inputs), targets, scored))
    total = count = 0.0
    for batch in itertools.islice(eval_iterator(data, corpus), eval_batches):
        loss, tokens = summed(model, batch["inputs"], batch["targets"], batch["loss_mask"] != 0)
        total, count = total + float(loss), count + float(tokens)
    return total / count


def plot(results: dict, ratios: list[str], path: str) -> None:
    """Loss and recall against the share of linear layers, one line per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    shares = [linear_share(ratio) for ratio in ratios]
    for mixer, rows in results.items():
        for ax, key in zip(axes, ("loss", "recall")):
            ax.plot(shares, [rows[ratio][key] for ratio in ratios], "o-", label=mixer)
    for ax, label in zip(axes, ("held-out loss (nats/byte)", "MQAR accuracy")):
        ax.set_xticks(shares, ratios)
        ax.set_xlabel("linear : attention layers")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet", "mamba2"])
    parser.add_argument("--ratios", nargs="+", default=["0:1", "3:1", "7:1", "1:0"], help="linear:attention")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--mlp-hidden", type=int, default=192)
    parser.add_argument("--lm-steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="language-model rows per step")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--recall-setting", default="4x64", choices=list(SETTINGS))
    parser.add_argument("--recall-steps", type=int, default=300)
    parser.add_argument("--recall-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="hybrid_ratio.png")
    args = parser.parse_args()
    for ratio in args.ratios:
        linear, full = (int(part) for part in ratio.split(":"))
        if linear + full == 0 or args.depth % (linear + full):
            parser.error(f"ratio {ratio}: its {linear + full} layers do not fill --depth {args.depth}")

    shape = {"d_model": args.d_model, "n_layers": args.depth, "n_heads": args.heads, "mlp_hidden": args.mlp_hidden}
    data = DataConfig(seq_len=args.seq_len, batch_size=args.batch, pack=False, cache_dir=str(CACHE))
    corpus = load_corpus(data)
    pairs, length, _ = SETTINGS[args.recall_setting]
    print(f"Hybrid ratios: d_model {args.d_model}, {args.depth} layers, {args.heads} heads, MLP {args.mlp_hidden}; "
          f"Shakespeare {args.lm_steps} steps x {args.batch} x {args.seq_len} bytes, held-out loss over "
          f"{args.eval_batches} batches; MQAR {args.recall_setting} {args.recall_steps} steps x {args.recall_batch}; "
          f"AdamW lr {args.lr}, jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print("| mixer | linear:attention | parameters | held-out loss | MQAR accuracy | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    results, shared = {}, {}
    for mixer, ratio in itertools.product(args.mixers, args.ratios):
        pattern = ratio_pattern(ratio, mixer)
        key = tuple(pattern)
        if key not in shared:  # the all-attention model is the same for every mixer
            start = time.perf_counter()
            options = {**shape, "layer_pattern": pattern}
            model = nnx.eval_shape(lambda: LanguageModel(build(ModelConfig, {"vocab_size": VOCAB, **options}, "model"),
                                                         rngs=nnx.Rngs(0)))
            loss = held_out_loss(options, data, corpus, steps=args.lm_steps, lr=args.lr,
                                 eval_batches=args.eval_batches, seed=args.seed)
            recall = train_and_score(options, pairs, length, args.d_model, steps=args.recall_steps,
                                     batch=args.recall_batch, lr=args.lr, seed=args.seed)
            shared[key] = {"parameters": parameter_counts(model)[0], "loss": loss, "recall": recall,
                           "seconds": time.perf_counter() - start}
        row = shared[key]
        results.setdefault(mixer, {})[ratio] = row
        print(f"| {mixer} | {ratio} | {row['parameters'] / 1e6:.3f}M | {row['loss']:.3f} | "
              f"{100 * row['recall']:.1f}% | {row['seconds']:.0f} |", flush=True)
    plot(results, args.ratios, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
