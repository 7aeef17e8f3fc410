"""From a DataConfig to tokenizer, documents and batch iterators for one process."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from seqmix.train.config import DataConfig
from seqmix.train.data import DataError, load_tokenizer, make_dataset, prepare_shakespeare, read_documents
from seqmix.train.data.instructions import Instruction, read_instructions


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    train_documents: list[str | Instruction]
    eval_documents: list[str | Instruction]


def load_corpus(config: DataConfig) -> Corpus:
    """Reads (preparing the embedded corpus on first use) the training and held-out documents."""
    tokenizer = load_tokenizer(config.tokenizer)
    if config.corpus == "shakespeare":
        directory = prepare_shakespeare(config.cache_dir)
        train_files, eval_files = [str(directory / "train.jsonl")], [str(directory / "valid.jsonl")]
    else:
        train_files, eval_files = config.train_files, config.eval_files
    if config.corpus == "alpaca":
        read = read_instructions
    else:
        read = functools.partial(read_documents, text_field=config.text_field)
    train = read(train_files)
    held_out = read(eval_files) if eval_files else []
    return Corpus(tokenizer, train, held_out)


def held_out_tokens(corpus: Corpus) -> np.ndarray:
    """The held-out plain-text documents encoded and joined in order, [n] int32 (instruction
    records left out): the text that generation-based evaluations draw their prompts from."""
    encoded = [corpus.tokenizer.encode(doc) for doc in corpus.eval_documents if isinstance(doc, str)]
    return np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, np.int32)


def _packed_batches(config: DataConfig, corpus: Corpus, documents: list[str], *, seed: int, training: bool):
    """This process's rows of the global batches (data.batch_size rows each)."""
    if config.batch_size % jax.process_count():
        raise DataError(f"data.batch_size={config.batch_size} is not divisible by {jax.process_count()} processes")
    dataset = make_dataset(
        documents, corpus.tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
        seed=seed, shuffle=training, repeat=training, pack=config.pack,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    return iter(dataset)


def train_iterator(config: DataConfig, corpus: Corpus, seed: int):
    """Endless, shuffled, packed batches (dicts of [B_local, T] int32 arrays); checkpointable."""
    return _packed_batches(config, corpus, corpus.train_documents, seed=seed, training=True)


def eval_iterator(config: DataConfig, corpus: Corpus):
    """One ordered pass over the held-out documents in packed batches."""
    return _packed_batches(config, corpus, corpus.eval_documents, seed=0, training=False)
