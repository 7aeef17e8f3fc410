"""Linearization end to end on CPU: pretrain a small softmax Llama-style model on the embedded
corpus, export it in the Hugging Face format, re-import it, convert it (Liger-GLA, Liger-HGRN2,
Liger attention, LoLCATs), LoRA-train each student for a fixed budget, and print a table.

    python benchmarks/linearize.py                                  # 600 teacher steps, 300 per student
    python benchmarks/linearize.py --teacher-steps 100 --student-steps 50   # a quick look

The teacher is `configs/models/transformer_small.yaml` trained by the stock trainer (the run
config of `make train` otherwise). Each Liger student gets LoRA (rank 8, alpha 8) on q/k/v, trains
those adapters alone (AdamW lr 1e-3, the teacher's batches of 8 x 256 bytes), and is scored on
the same held-out batches as the teacher, in nats per byte. LoLCATs follows its paper: first
attention transfer (--transfer-steps, Adam lr 1e-2, on the same kind of batches) trains its
feature maps and window factors alone, then LoRA (rank 8, alpha 16) on q/k/v/o trains for the
same budget as the others; its tokens, parameters and seconds count both stages. "recovered" is the share of the gap
between the converted-but-untrained student and the teacher that training closed;
"after / teacher" is the held-out loss ratio (within 1.10 is the bar for Liger attention).
"""

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqmix.layers.transfer import TransferParam
from seqmix.models.hf import from_pretrained, save_pretrained
from seqmix.models.linearize import linearize
from seqmix.models.lora import add_lora
from seqmix.train.attention_transfer import attention_transfer, converted_layers
from seqmix.train.config import load_train_config
from seqmix.train.data import make_dataset
from seqmix.train.loss import cross_entropy_sum
from seqmix.train.trainer import Trainer
from training import adamw_training

METHODS = ("liger_gla", "liger_hgrn2", "liger_attention", "lolcats")
LORA = {"lolcats": {"rank": 8, "alpha": 16.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}}
LIGER_LORA = {"rank": 8, "alpha": 8.0, "targets": ("q_proj", "k_proj", "v_proj")}


def held_out_loss(model, batches) -> float:
    """Mean nats per scored token of `model` over the held-out batches."""
    @nnx.jit
    def summed(model, inputs, targets, scored):
        return cross_entropy_sum(model(inputs), targets, scored)

    total = count = 0.0
    for batch in batches:
        loss, tokens = summed(model, batch["inputs"], batch["targets"], batch["loss_mask"] != 0)
        total, count = total + float(loss), count + float(tokens)
    return total / count


def lora_train(student, batches, steps: int) -> tuple[int, int]:
    """Trains the student's LoRA adapters alone for `steps` steps; (trainable parameters, tokens)."""
    step, params, opt_state = adamw_training(student, optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps // 10, steps),
                                             trainable=nnx.LoRAParam)
    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = 0
    for batch in itertools.islice(batches, steps):
        scored = batch["loss_mask"] != 0
        params, opt_state, _ = step(params, opt_state, batch["inputs"], batch["targets"], scored)
        tokens += int(scored.sum())
    nnx.update(student, params)
    return sum(x.size for x in jax.tree.leaves(params)), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--transfer-steps", type=int, default=100, help="LoLCATs' attention transfer steps")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="seqmix-linearize-"))
    config = load_train_config("configs/runs/shakespeare.yaml", [
        "model=configs/models/transformer_small.yaml", f"steps={args.teacher_steps}", f"out_dir={work / 'teacher'}",
        "sample_tokens=0", f"eval_every={args.teacher_steps}", "mesh.data=1",
        f"optim.warmup_steps={min(100, args.teacher_steps // 10)}"])
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.run()
    teacher_seconds = time.perf_counter() - start
    save_pretrained(trainer.train_state.model(), config.model, work / "teacher_hf")
    teacher = from_pretrained(work / "teacher_hf")  # what every student starts from

    data = config.data
    evaluation = [{k: jnp.asarray(v) for k, v in batch.items()} for batch in itertools.islice(
        make_dataset(trainer.corpus.eval_documents, trainer.corpus.tokenizer, seq_len=data.seq_len,
                     batch_size=data.batch_size, seed=0, shuffle=False, repeat=False), args.eval_batches)]
    teacher_loss = held_out_loss(teacher, evaluation)
    reimport_gap = abs(teacher_loss - held_out_loss(trainer.train_state.model(), evaluation))

    print(f"\nLinearization on CPU (jax {jax.__version__}): teacher transformer_small, {args.teacher_steps} steps "
          f"({teacher_seconds:.0f} s), exported to and re-imported from the Hugging Face format (held-out loss "
          f"change {reimport_gap:.1e}); students: LoRA r8/a8 on q/k/v (LoLCATs: {args.transfer_steps} attention "
          f"transfer steps, then r8/a16 on q/k/v/o), {args.student_steps} LoRA steps of "
          f"{data.batch_size}x{data.seq_len}; held-out nats/byte over {args.eval_batches} batches\n")
    print("| model | held-out before | held-out after | after / teacher | recovered | trainable params | "
          "tokens | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| teacher (softmax attention) | {teacher_loss:.3f} | | 1.000 | | "
          f"{sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param))):,} | "
          f"{args.teacher_steps * data.batch_size * data.seq_len:,} | {teacher_seconds:.0f} |", flush=True)
    notes = []
    for index, method in enumerate(args.methods):
        start = time.perf_counter()
        student, _ = linearize(teacher, config.model, method)
        before = held_out_loss(student, evaluation)
        batches = ({k: jnp.asarray(v) for k, v in batch.items()} for batch in make_dataset(
            trainer.corpus.train_documents, trainer.corpus.tokenizer, seq_len=data.seq_len,
            batch_size=data.batch_size, seed=1 + index))
        transferred = tokens = 0
        if converted_layers(student):  # LoLCATs: attention transfer first
            losses = attention_transfer(teacher, student, batches, steps=args.transfer_steps, lr=1e-2)
            transferred = sum(x.size for x in jax.tree.leaves(nnx.state(student, TransferParam)))
            tokens = args.transfer_steps * data.batch_size * data.seq_len
            notes.append(f"{method} attention transfer: {args.transfer_steps} steps, relative error of the converted "
                         f"layers {losses[0]:.3f} -> {losses[-1]:.3f}, held-out loss {before:.3f} -> "
                         f"{held_out_loss(student, evaluation):.3f} before LoRA")
        add_lora(student, **LORA.get(method, LIGER_LORA), rngs=nnx.Rngs(index))
        trainable, lora_tokens = lora_train(student, batches, args.student_steps)
        after = held_out_loss(student, evaluation)
        recovered = f"{100 * (before - after) / (before - teacher_loss):.0f}%" if before > teacher_loss else "n/a"
        parameters = f"{trainable:,}" + (f" + {transferred:,} (stage 1)" if transferred else "")
        print(f"| {method} | {before:.3f} | {after:.3f} | {after / teacher_loss:.3f} | {recovered} | "
              f"{parameters} | {tokens + lora_tokens:,} | {time.perf_counter() - start:.0f} |", flush=True)
    print("", *notes, sep="\n")
    np.testing.assert_allclose(reimport_gap, 0.0, atol=1e-4)


if __name__ == "__main__":
    main()
