"""Linearization end to end on CPU, through the command a user runs: pretrain a small softmax
Llama-style teacher on the embedded corpus, export it in the Hugging Face format, then
`seqmix linearize` it into each student and judge every student as the papers do, by held-out
loss, multiple choice, generation agreement with the teacher, pass-key retrieval and decoding cost.

    python benchmarks/linearize.py                                   # the table of RESULTS.md
    python benchmarks/linearize.py --teacher-steps 60 --student-steps 30 --stage-steps 10 --students liger_gla gdn

Students (each `seqmix linearize TEACHER ...` with the run named, in process):
    liger_gla       --method liger_gla, LoRA r8/a8 on q/k/v (configs/runs/linearize.yaml)
    lolcats         --method lolcats: attention transfer (the feature maps and window factors
                    alone), then LoRA r8/a16 on q/k/v/o (configs/runs/lolcats.yaml)
    gdn, rwkv7      --student gated_deltanet / rwkv7 with configs/runs/distill.yaml: attention
                    output, hidden states (the converted layers), then KL (the whole model)
    gdn_3to1_selected / gdn_3to1_uniform  the gdn recipe keeping one of the four layers as softmax
                    attention: chosen by layer selection (--select-layers 1) or the last (--keep 3)
Every student gets the same budget, --student-steps steps of 8 x 256 tokens in all: --stage-steps
in each stage before the last (LoLCATs' transfer, the distilled students' attention and hidden
stages) and the rest in the last (LoRA or KL); "tokens" counts every stage's. Measures, all on held-out
text the runs never trained on: held-out loss (nats/byte) over --eval-batches batches; "MC": a
cloze task built from the held-out text (a 192-byte context, its true next 32 bytes against three
32-byte pieces from elsewhere); "agreement": greedy continuations of 64 prompts of 64 bytes against
the teacher's, identical over 32 bytes (share) and common prefix (mean bytes), as `seqmix eval
--agreement`; "needle": pass-key retrieval at each --needle length, 20 trials, as `seqmix eval
--needle`; "decode": the cache bytes of one row at --context tokens and greedy tokens/s after a
prefill of that many tokens.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from seqmix.cli import main as seqmix
from seqmix.models.hf import save_pretrained
from seqmix.train.agreement import agreement, greedy_continuations, held_out_prompts
from seqmix.train.config import load_train_config
from seqmix.train.evaluate import run_held_out_loss
from seqmix.train.inputs import held_out_tokens, load_corpus
from seqmix.train.multiple_choice import ChoiceExample, evaluate_choices
from seqmix.train.needle import needle_accuracy
from seqmix.train.run_loader import LoadedRun, open_run

STUDENTS = {
    "liger_gla": ["--method", "liger_gla"],
    "lolcats": ["--method", "lolcats"],
    "gdn": ["--student", "gated_deltanet", "--run", "configs/runs/distill.yaml"],
    "rwkv7": ["--student", "rwkv7", "--run", "configs/runs/distill.yaml"],
    "gdn_3to1_selected": ["--student", "gated_deltanet", "--run", "configs/runs/distill.yaml", "--select-layers", "1"],
    "gdn_3to1_uniform": ["--student", "gated_deltanet", "--run", "configs/runs/distill.yaml", "--keep", "3"],
}


def cloze_task(text: np.ndarray, tokenizer, count: int = 64, context: int = 192, piece: int = 32,
               seed: int = 0) -> list[ChoiceExample]:
    """Multiple choice from held-out bytes: which of four 32-byte pieces continues the context."""
    rng = np.random.default_rng(seed)
    starts = np.linspace(0, len(text) - context - piece, count).astype(int)
    examples = []
    for start in starts:
        true = text[start + context:start + context + piece]
        others = [text[offset:offset + piece] for offset in rng.integers(0, len(text) - piece, 3)]
        gold = int(rng.integers(0, 4))
        choices = others[:gold] + [true] + others[gold:]
        examples.append(ChoiceExample(tokenizer.decode(text[start:start + context]),
                                      tuple(tokenizer.decode(choice) for choice in choices), gold))
    return examples


def decoding(model, context: int, new_tokens: int = 64) -> tuple[int, float]:
    """(cache bytes of one row of `context` + new tokens, greedy tokens/s after the prefill): the
    time of a prefill and 1 + new_tokens tokens less that of the prefill and one, each compiled first
    and the fastest of three (one timing each went negative on a shared machine)."""
    cache = model.init_cache(1, context + new_tokens + 1)
    cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    prompt = np.random.default_rng(0).integers(32, 127, context).astype(np.int32)

    def seconds(tokens: int) -> float:
        greedy_continuations(model, [prompt], tokens)  # compiled for this length
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            greedy_continuations(model, [prompt], tokens)
            timings.append(time.perf_counter() - start)
        return min(timings)

    return cache_bytes, new_tokens / (seconds(1 + new_tokens) - seconds(1))


def judge(run: LoadedRun, teacher_continuations, prompts, corpus, text, args) -> dict:
    """The row of one run's model (the teacher included); corpus: the held-out documents."""
    model, tokenizer = run.model, corpus.tokenizer
    evaluation = run_held_out_loss(run, corpus)
    choices = evaluate_choices(model, tokenizer, cloze_task(text, tokenizer))
    continuations = greedy_continuations(model, prompts, 32)
    agreed = agreement(continuations, teacher_continuations if teacher_continuations is not None else continuations)
    needles = needle_accuracy(lambda p, n: greedy_continuations(model, p, n), tokenizer, text, args.needle,
                              trials=20)
    cache_bytes, tokens_per_s = decoding(model, args.context)
    return {"loss": evaluation["eval_loss"], "mc": choices["acc"], "exact": agreed.exact,
            "prefix": agreed.common_prefix, "needle": needles, "cache": cache_bytes, "tok_s": tokens_per_s,
            "continuations": continuations}


def tokens_used(run: Path) -> int:
    """Tokens of every stage of a run: steps x batch x length from each stage's config."""
    total = 0
    for config_file in [*sorted((run / "stages").glob("*/config.yaml")), run / "config.yaml"]:
        config = load_train_config(config_file, [f"out_dir={config_file.parent}"])
        total += config.steps * config.data.batch_size * config.data.seq_len
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=500, help="steps of each student, all stages")
    parser.add_argument("--stage-steps", type=int, default=100, help="steps of each stage before the last")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--needle", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--context", type=int, default=4096, help="context of the decoding measure")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="seqmix-linearize-"))
    common = ["sample_tokens=0", "mesh.data=1", f"eval_batches={args.eval_batches}"]
    start = time.perf_counter()
    assert seqmix(["train", "configs/runs/shakespeare.yaml", "model=configs/models/transformer_small.yaml",
                   f"steps={args.teacher_steps}", f"out_dir={work / 'teacher'}", f"eval_every={args.teacher_steps}",
                   f"optim.warmup_steps={min(100, args.teacher_steps // 10)}", *common]) == 0
    teacher_seconds = time.perf_counter() - start
    teacher_run = open_run(work / "teacher")
    save_pretrained(teacher_run.model, teacher_run.config.model, work / "teacher_hf")
    corpus = load_corpus(teacher_run.config.data, training=False)  # every run reads the same text
    text = held_out_tokens(corpus)
    prompts = held_out_prompts(text, 64, 64)
    rows = {"teacher (softmax attention)": {**judge(teacher_run, None, prompts, corpus, text, args),
                                            "tokens": tokens_used(work / "teacher"), "seconds": teacher_seconds}}
    reference = rows["teacher (softmax attention)"]["continuations"]
    print(json.dumps({"teacher": {k: v for k, v in rows["teacher (softmax attention)"].items()
                                  if k != "continuations"}}), flush=True)
    for name in args.students:
        run = work / name
        start = time.perf_counter()
        last = args.student_steps - args.stage_steps * (2 if "configs/runs/distill.yaml" in STUDENTS[name] else
                                                         1 if name == "lolcats" else 0)
        budget = [f"steps={last}", f"eval_every={last}", f"checkpoint.every_steps={args.student_steps}",
                  f"optim.warmup_steps={min(30, last // 10)}"]
        if "configs/runs/distill.yaml" in STUDENTS[name]:
            budget = [f"steps={args.stage_steps}", f"eval_every={args.stage_steps}",
                      f"checkpoint.every_steps={args.student_steps}",
                      f"optim.warmup_steps={min(10, args.stage_steps // 10)}",
                      "stages=[{name: attention, distill: {loss: attention_output, train: converted}}, "
                      "{name: hidden, distill: {loss: hidden_states, train: converted}}, "
                      f"{{name: kl, steps: {last}, eval_every: {last}, "
                      f"optim: {{warmup_steps: {min(30, last // 10)}}}, distill: {{loss: kl}}}}]"]
        elif name == "lolcats":
            budget.append(f"stages.transfer.steps={args.stage_steps}")
        assert seqmix(["linearize", str(work / "teacher_hf"), *STUDENTS[name], f"out_dir={run}", *budget,
                       *common]) == 0, name
        seconds = time.perf_counter() - start
        rows[name] = {**judge(open_run(run), reference, prompts, corpus, text, args),
                      "tokens": tokens_used(run), "seconds": seconds}
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "continuations"}}), flush=True)

    teacher_loss = rows["teacher (softmax attention)"]["loss"]
    print(f"\nLinearization on CPU (jax {jax.__version__}): teacher transformer_small, {args.teacher_steps} steps; "
          f"students: {args.student_steps} steps in all, {args.stage_steps} in each stage before the last; "
          f"held-out nats/byte over {args.eval_batches} batches; needle at {args.needle}; decoding at "
          f"{args.context} tokens of context\n")
    print("| model | tokens | held-out | / teacher | MC acc | agreement (32 B identical) | common prefix (B) | "
          + " | ".join(f"needle {length}" for length in args.needle) + f" | cache at {args.context} | decode tok/s | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.needle) + "---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens']:,} | {row['loss']:.3f} | {row['loss'] / teacher_loss:.3f} | "
              f"{100 * row['mc']:.1f}% | {100 * row['exact']:.1f}% | {row['prefix']:.1f} | "
              + " | ".join(f"{100 * row['needle'][length]:.0f}%" for length in args.needle)
              + f" | {row['cache'] / 2**20:.2f} MiB | {row['tok_s']:.0f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
