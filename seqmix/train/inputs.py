"""From a DataConfig to tokenizer, documents and batch iterators for one process."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from seqmix.train.config import DataConfig
from seqmix.train.data import (DataError, Mixture, TokenizedDocuments, load_tokenizer, make_dataset,
                                prepare_shakespeare, read_documents)
from seqmix.train.data.instructions import Instruction, read_instructions
from seqmix.train.data.pipeline import Documents


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    train_documents: Documents  # text, instructions, pre-tokenized documents, or a mixture of those
    eval_documents: list[str | Instruction] | TokenizedDocuments


def load_corpus(config: DataConfig, *, training: bool = True) -> Corpus:
    """Reads (preparing the embedded corpus on first use) the training and held-out documents;
    pre-tokenized directories are opened, not read: their documents are read as batches need them.
    training=False leaves the training documents out (an empty list; their files need not exist):
    what evaluating a trained model reads."""
    tokenizer = load_tokenizer(config.tokenizer)
    if config.corpus == "tokenized":
        return Corpus(tokenizer, _tokenized_training(config) if training else [],
                      TokenizedDocuments(config.eval_files, config.tokenizer) if config.eval_files else [])
    if config.corpus == "shakespeare":
        directory = prepare_shakespeare(config.cache_dir)
        train_files, eval_files = [str(directory / "train.jsonl")], [str(directory / "valid.jsonl")]
    else:
        train_files, eval_files = config.train_files, config.eval_files
    if config.corpus == "alpaca":
        read = read_instructions
    else:
        read = functools.partial(read_documents, text_field=config.text_field)
    train = read(train_files) if training else []
    held_out = read(eval_files) if eval_files else []
    return Corpus(tokenizer, train, held_out)


def _tokenized_training(config: DataConfig) -> Documents:
    """The training documents of `corpus: tokenized`: train_files' directories one after another,
    or the `sources` mixed by weight."""
    if not config.sources:
        return TokenizedDocuments(config.train_files, config.tokenizer)
    corpora = [TokenizedDocuments([source.path], config.tokenizer) for source in config.sources]
    return corpora[0] if len(corpora) == 1 else Mixture(corpora, [source.weight for source in config.sources])


def held_out_tokens(corpus: Corpus) -> np.ndarray:
    """The held-out plain-text documents encoded and joined in order, [n] int32 (instruction
    records left out): the text that generation-based evaluations draw their prompts from."""
    encoded = [corpus.tokenizer.encode(doc) if isinstance(doc, str) else doc
               for doc in corpus.eval_documents if not isinstance(doc, Instruction)]
    return np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, np.int32)


def _packed_batches(config: DataConfig, corpus: Corpus, documents: Documents, *, seed: int, training: bool):
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
