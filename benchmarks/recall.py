"""Multi-query associative recall (MQAR) accuracy of small models, one per mixer or hybrid.

    python benchmarks/recall.py                        # every model and setting (CPU: many hours)
    python benchmarks/recall.py --models attention gated_deltanet --settings 4x64 8x128 --steps 1000

Each model (2 layers, or 2 x (gated conv, attention) in Zoology's layout; d_model 64, 2 heads,
vocabulary 64, weights ~ N(0, 1/d_model)) trains for a fixed budget of
`--steps` steps of the trainer's own step (benchmarks/training.py: AdamW) on fresh MQAR batches (seqmix.train.data.recall) of one setting, then is
scored on 1024 held-out rows: the fraction of recurring keys whose value it predicts. Settings
grow harder with more pairs, longer rows, and (`@32`) a smaller model width, i.e. a smaller
recurrent state. A bidirectional model (hydra, bidirectional attention), which would read each
answer right after its key, is trained and scored on masked recall instead: the answers hidden
behind a mask token, the same recall with the tokens after the query visible too
(`masked_recall`). Prints one markdown table of accuracies.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.train.data.recall import mqar_batch
from training import as_batch, stock_training

VOCAB = 64

MODELS = {
    "attention": {"layer_pattern": ["attention"]},
    "sliding_window(16)": {"layer_pattern": ["local"], "mixers": {"local": {"type": "attention", "sliding_window": 16}}},
    "linear_attention": {"layer_pattern": ["linear_attention"]},
    "local_linear_attention": {"layer_pattern": ["local_linear_attention"]},
    "nalaformer": {"layer_pattern": ["nalaformer"]},
    "retnet": {"layer_pattern": ["retnet"]},
    "gla": {"layer_pattern": ["gla"]},
    "hgrn2": {"layer_pattern": ["hgrn2"]},
    "mamba2": {"layer_pattern": ["mamba2"]},
    "mamba": {"layer_pattern": ["mamba"]},
    "longhorn": {"layer_pattern": ["longhorn"]},
    "s4d": {"layer_pattern": ["s4d"]},
    "spectral_ssm": {"layer_pattern": ["spectral_ssm"]},
    "deltanet": {"layer_pattern": ["deltanet"]},
    "gated_deltanet": {"layer_pattern": ["gated_deltanet"]},
    "gated_deltaproduct": {"layer_pattern": ["gated_deltaproduct"]},
    "gated_deltanet2": {"layer_pattern": ["gated_deltanet2"]},
    "kda": {"layer_pattern": ["kda"]},
    "rwkv6": {"layer_pattern": ["rwkv6"]},
    "rwkv7": {"layer_pattern": ["rwkv7"]},
    "mom": {"layer_pattern": ["mom"]},
    "lightning": {"layer_pattern": ["lightning"]},
    "liger_attention(16)": {"layer_pattern": ["liger"], "mixers": {"liger": {"type": "liger_attention", "window": 16}}},
    # B'MOJO: a 16-token window, 16 eidetic slots (tokens elected for their innovation) and a fading SSM read-out
    "bmojo(16+16)": {"layer_pattern": ["bmojo"], "mixers": {"bmojo": {"window": 16, "memory": 16}}},
    # Bidirectional: masked recall (`masked_recall`), with a mask token past the task's vocabulary
    "hydra": {"layer_pattern": ["hydra"], "vocab_size": VOCAB + 1},
    "bidirectional_attention": {"layer_pattern": ["attention"], "mixers": {"attention": {"causal": False}},
                                "vocab_size": VOCAB + 1},
    "gated_deltanet+attention": {"layer_pattern": ["gated_deltanet", "attention"]},
    # Zoology's layout: a gated short convolution in front of each attention layer.
    "gated_conv+attention": {"n_layers": 4, "layer_pattern": ["gated_conv", "attention"]},
}

# name: (pairs, sequence length, d_model)
SETTINGS = {"4x64": (4, 64, 64), "8x128": (8, 128, 64), "16x128": (16, 128, 64), "16x256": (16, 256, 64),
            "8x128@32": (8, 128, 32)}


def masked_recall(inputs, targets, scored):
    """MQAR for a bidirectional model, which would read each answer as the token after its key:
    the value after each recurring key is hidden behind the mask token VOCAB and predicted there.
    Same arrays in, same arrays out (inputs, targets [B, T] int32, scored [B, T] bool)."""
    answers = np.roll(scored, 1, axis=1)  # a recurring key is never a row's last token
    return np.where(answers, VOCAB, inputs), np.roll(targets, 1, axis=1), answers


def train_and_score(model_options: dict, pairs: int, length: int, width: int, *, steps: int, batch: int,
                    lr: float, seed: int) -> float:
    """Trains a fresh model on MQAR(pairs, length) and returns its held-out accuracy."""
    # Weights ~ N(0, 1/width) rather than the language models' 0.02: at width 64, 0.02 leaves the
    # attention logits near 0 and the models sat on MQAR's plateau for thousands of steps.
    config = build(ModelConfig, {"vocab_size": VOCAB, "d_model": width, "n_layers": 2, "n_heads": 2,
                                 "mlp_hidden": 2 * width, "init_std": width ** -0.5, **model_options}, "model")
    task = masked_recall if config.non_causal_layers() else lambda *batch: batch
    step, train_state = stock_training(config, steps=steps, lr=lr, warmup_steps=steps // 10, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        train_state.state, _ = step(train_state.state, as_batch(*task(*mqar_batch(rng, batch, length, pairs, VOCAB))),
                                    None)
    model = train_state.model()

    @nnx.jit
    def correct(model, inputs, targets, scored):
        return jnp.sum((jnp.argmax(model(inputs), axis=-1) == targets) & scored)

    held_out = np.random.default_rng(10_000 + seed)
    hits = sum(int(correct(model, *task(*mqar_batch(held_out, 256, length, pairs, VOCAB)))) for _ in range(4))
    return hits / (4 * 256 * pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"MQAR accuracy, {args.steps} steps x {args.batch} rows, AdamW lr {args.lr}, jax {jax.__version__} "
          f"on {jax.devices()[0].device_kind}\n")
    print("| model | " + " | ".join(args.settings) + " | seconds |")
    print("|---|" + "---:|" * (len(args.settings) + 1))
    for name in args.models:
        start = time.perf_counter()
        scores = [train_and_score(MODELS[name], *SETTINGS[setting], steps=args.steps, batch=args.batch,
                                  lr=args.lr, seed=args.seed) for setting in args.settings]
        cells = " | ".join(f"{100 * score:.1f}%" for score in scores)
        print(f"| {name} | {cells} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
