"""Data throughput: tokenizing a corpus, loading batches, against what the train step consumes.

    python benchmarks/data.py
    python benchmarks/data.py --batches 400 --steps 20 --bpe-vocab 8192

On the embedded Shakespeare training text (`prepare_shakespeare`, about 5 MB):
- tokenization: `seqmix data tokenize`'s work (`tokenize_corpus`: read, tokenize, write the shards
  and manifest) with 1 and 2 worker processes, for the byte tokenizer and a byte-level BPE of
  --bpe-vocab tokens trained on the same text; tokens/s over the whole call, pool start included;
- loader: the training iterator of configs/runs/shakespeare.yaml's data settings (packed rows of
  seq_len 256, batch 8, shuffled) over the pre-tokenized shards and over the text (tokenized when
  the iterator is built: its start-up time is its own column), batches/s x tokens per batch. A
  piece is read by reading its whole document, and the 42 works average 114K tokens: the shards
  are read again with the works cut into documents of about --doc-chars characters (at line
  ends), nearer a web corpus;
- train step: the step time of shakespeare.yaml's model (configs/models/hybrid_small.yaml) on such
  batches, through the trainer's own compiled step: the tokens/s that training consumes.
The last column is the loader's tokens/s over the train step's: how many times over the loader
keeps up with training on this machine.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import tokenizers

from seqmix.train.config import load_train_config
from seqmix.train.data import prepare_shakespeare, read_documents, tokenize_corpus
from seqmix.train.evaluate import to_global
from seqmix.train.inputs import load_corpus, train_iterator
from seqmix.train.sharding import batch_sharding
from seqmix.train.trainer import Trainer

RUN = Path(__file__).parent.parent / "configs" / "runs" / "shakespeare.yaml"


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> str:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts`, saved at `path`."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return str(path)


def cut_documents(texts: list[str], chars: int) -> list[str]:
    """`texts` cut at line ends into documents of about `chars` characters."""
    documents = []
    for text in texts:
        start = 0
        while start < len(text):
            stop = text.find("\n", start + chars) + 1 or len(text)
            documents.append(text[start:stop])
            start = stop
    return documents


def tokenization_speed(files: list[str], tokenizer: str, workers: int, scratch: Path) -> tuple[int, float]:
    """(tokens, seconds) of one `tokenize_corpus` call into a fresh directory."""
    out = scratch / f"tokenized-{Path(tokenizer).stem}-{workers}"
    start = time.perf_counter()
    manifest = tokenize_corpus(files, tokenizer, out, workers=workers)
    return manifest["tokens"], time.perf_counter() - start


def loader_speed(data, seed: int, batches: int) -> tuple[float, float]:
    """(seconds to build the iterator and yield its first batch, batches/s after that)."""
    start = time.perf_counter()
    iterator = train_iterator(data, load_corpus(data), seed)
    next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return startup, batches / (time.perf_counter() - start)


def step_seconds(config, steps: int) -> float:
    """Median seconds of the trainer's compiled train step on one batch of the run's data."""
    trainer = Trainer(config)
    micro = [next(trainer.data) for _ in range(config.grad_accum)]
    batch = to_global({key: np.stack([m[key] for m in micro]) for key in micro[0]},
                      batch_sharding(trainer.mesh, leading_dims=1))
    state = trainer.train_state.state
    state, metrics = trainer.train_step(state, batch, trainer.teacher_state)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch, trainer.teacher_state)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="loader batches timed")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--doc-chars", type=int, default=4096, help="document size of the loader's second corpus")
    parser.add_argument("--cache-dir", default=".cache/seqmix")
    args = parser.parse_args()

    train_file = str(prepare_shakespeare(args.cache_dir) / "train.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        works = read_documents([train_file])
        bpe = train_bpe(works, args.bpe_vocab, scratch / f"bpe{args.bpe_vocab}.json")
        print(f"Data throughput on {platform.machine()} with {os.cpu_count()} CPUs, jax {jax.__version__}; corpus "
              f"{Path(train_file).stat().st_size / 2**20:.1f} MiB of Shakespeare\n")
        print("| tokenization | workers | tokens | seconds | tokens/s |")
        print("|---|---:|---:|---:|---:|")
        for name, tokenizer in (("byte", "byte"), (f"BPE {args.bpe_vocab}", bpe)):
            for workers in (1, 2):
                tokens, seconds = tokenization_speed([train_file], tokenizer, workers, scratch)
                print(f"| {name} | {workers} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} |", flush=True)

        config = load_train_config(RUN, [f"out_dir={scratch / 'run'}"])
        data = config.data
        step_tokens = data.batch_size * data.seq_len * config.grad_accum
        seconds = step_seconds(config, args.steps)
        consumed = step_tokens / seconds
        print(f"\ntrain step of {RUN.name}'s model ({step_tokens} tokens, batch {data.batch_size} x seq_len "
              f"{data.seq_len}): {seconds * 1e3:.0f} ms, {consumed:,.0f} tokens/s\n")
        print("| loader | start-up s | batches/s | tokens/s | x train step |")
        print("|---|---:|---:|---:|---:|")
        short = scratch / "short.jsonl"
        short.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in cut_documents(works, args.doc_chars)))
        tokenize_corpus([str(short)], "byte", scratch / "tokenized-short")
        loaders = [("pre-tokenized shards, 42 works", "tokenized-byte-1"),
                   (f"pre-tokenized shards, {args.doc_chars}-character documents", "tokenized-short")]
        loaders = [(name, dataclasses.replace(data, corpus="tokenized", train_files=[str(scratch / directory)],
                                              eval_files=[])) for name, directory in loaders]
        for name, settings in (*loaders, ("text (the 42 works, tokenized at start)", data)):
            startup, per_second = loader_speed(settings, config.seed, args.batches)
            tokens = per_second * data.batch_size * data.seq_len
            print(f"| {name} | {startup:.2f} | {per_second:,.1f} | {tokens:,.0f} | {tokens / consumed:,.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
