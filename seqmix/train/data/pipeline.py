"""Token streams -> packed, batched rows for next-token prediction, as a grain pipeline.

Each document is tokenized (or read pre-tokenized: `tokenized.py`) and cut into pieces of at most
`seq_len + 1` tokens that overlap by one token (piece k covers tokens [k*seq_len, (k+1)*seq_len]),
so that every next-token pair of a document is a target exactly once. A piece gives
`inputs = piece[:-1]`, `targets = piece[1:]` and `loss_mask` (1 where the target is scored:
everywhere in plain text, in the response of an instruction); grain's first-fit packing puts
several short pieces into one row, told apart by segment ids, or (`pack=False`) each piece has a
row of its own, padded.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from seqmix.train.data.errors import DataError
from seqmix.train.data.instructions import Instruction, document_tokens
from seqmix.train.data.tokenized import TokenizedDocuments
from seqmix.train.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Several corpora drawn from by weight: of the pieces of the stream, a share weights[i] /
    sum(weights) comes from corpora[i] (grain's deterministic interleave, each corpus shuffled on
    its own), whatever their sizes; a smaller corpus repeats sooner."""

    corpora: list
    weights: list[float]


Documents = list[str | Instruction] | TokenizedDocuments | Mixture


class _Pieces:
    """Random-access source of pieces: element i is {"inputs", "targets", "loss_mask"}, int32 [len_i - 1].

    Document d gives ceil((lengths[d] - 1) / seq_len) pieces, in order; `read(d)` returns its
    (tokens [n] integers, trained [n] int32 or None: every target trained), only when one of its
    pieces is asked for.
    """

    def __init__(self, read, lengths: np.ndarray, seq_len: int):
        self._read, self._seq_len = read, seq_len
        # Pieces start every seq_len tokens while at least 2 tokens (one input, one target) remain.
        counts = -(-np.maximum(np.asarray(lengths, np.int64) - 1, 0) // seq_len)
        if not counts.any():
            raise DataError("no document has the 2 tokens needed for one training example")
        self._first_piece = np.concatenate([[0], np.cumsum(counts)])  # [documents + 1]

    def __len__(self) -> int:
        return int(self._first_piece[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        document = int(np.searchsorted(self._first_piece, index, side="right")) - 1
        start = (index - int(self._first_piece[document])) * self._seq_len
        tokens, trained = self._read(document)
        piece = np.asarray(tokens[start:start + self._seq_len + 1], np.int32)
        loss_mask = np.ones(len(piece) - 1, np.int32) if trained is None else trained[start + 1:start + len(piece)]
        return {"inputs": piece[:-1], "targets": piece[1:], "loss_mask": loss_mask}


def _pieces(documents: list[str | Instruction] | TokenizedDocuments, tokenizer: Tokenizer, seq_len: int) -> _Pieces:
    if isinstance(documents, TokenizedDocuments):  # plain text: every target trained
        return _Pieces(lambda d: (documents.stored(d), None), documents.lengths, seq_len)
    encoded = [document_tokens(doc, tokenizer) for doc in documents]
    lengths = np.array([len(tokens) for tokens, _ in encoded], np.int64)
    # One array for all, sliced per document: far less memory than an array per document.
    tokens = np.concatenate([tokens for tokens, _ in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32)
    trained = np.concatenate([mask for _, mask in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return _Pieces(lambda d: (tokens[offsets[d]:offsets[d + 1]], trained[offsets[d]:offsets[d + 1]]), lengths, seq_len)


BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")  # each int32 [B, seq_len]


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # inputs and targets have equal lengths, so their segment ids and positions are the same.
    renamed = (batch["inputs"], batch["targets"], batch["loss_mask"], batch["inputs_segment_ids"],
               batch["inputs_positions"])
    return dict(zip(BATCH_KEYS, renamed))


def _own_row(piece: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """A piece alone in a row of seq_len, padded at its end (the packer's keys and layout)."""
    length = len(piece["inputs"])
    padded = {key: np.pad(value, (0, seq_len - length)) for key, value in piece.items()}
    segment_ids = (np.arange(seq_len) < length).astype(np.int32)
    return {**padded, "inputs_segment_ids": segment_ids, "inputs_positions": np.arange(seq_len, dtype=np.int32) * segment_ids}


def make_dataset(documents: Documents, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, repeat: bool = True, pack: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """Packed batches of next-token examples from `documents` (`pack=False`: a piece per row).

    `documents`: text documents or instructions (tokenized here with `tokenizer`), the documents of
    pre-tokenized directories (`TokenizedDocuments`, the same batches as their text would give), or
    a `Mixture` of such corpora.

    Yields dicts of int32 numpy arrays, each of shape [batch_size / process_count, seq_len]:
      inputs, targets: token ids, targets[b, t] the token after inputs[b, t]; 0 at padding.
      segment_ids: 1, 2, ... for the pieces packed in a row, 0 at padding.
      positions: index of the token within its piece, restarting at 0 with each segment.
      loss_mask: 1 where the target is scored (plain text: everywhere; an instruction: its
        response), 0 at padding.
    Pieces are shuffled with `seed`, differently each epoch (`shuffle`); `repeat` makes the stream
    infinite, otherwise it ends after one epoch (the last incomplete batch dropped; of a mixture,
    when its first corpus runs out).
    `batch_size` is the global batch: process `process_index` of `process_count` keeps rows
    [i * b, (i + 1) * b) of each (b = batch_size / process_count). Every process packs the same
    global stream (cheap next to a train step), so the global batches, and the iterator state a
    checkpoint stores, do not depend on the number of processes: a run resumes exactly on any.
    The iterator's `get_state()` / `set_state()` resume exactly; iteration is deterministic.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    corpora = documents.corpora if isinstance(documents, Mixture) else [documents]
    streams = []
    for index, corpus in enumerate(corpora):
        stream = grain.MapDataset.source(_pieces(corpus, tokenizer, seq_len))
        if shuffle:
            stream = stream.shuffle(seed + index)
        streams.append(stream.repeat() if repeat else stream)
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, documents.weights)
    # Reading a piece is a slice of one array: prefetch threads would cost more than they save.
    pieces = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if pack:
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
            num_packing_bins=batch_size, shuffle_bins=False)
    else:
        rows = pieces.map(lambda piece: _own_row(piece, seq_len))
    batches = rows.batch(batch_size, drop_remainder=True).map(_rename)
    if process_count == 1:
        return batches
    rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
    return batches.map(lambda batch: {key: value[rows] for key, value in batch.items()})


def unigram_entropy(documents: Documents, tokenizer: Tokenizer) -> float:
    """Entropy (nats/token) of the token frequencies of `documents` (of a mixture: of its
    corpora's frequencies mixed by weight).

    It is the cross-entropy of the best model that ignores context, on these documents: the
    baseline a trained model must beat.
    """
    if isinstance(documents, Mixture):
        shares = [_token_counts(corpus, tokenizer) for corpus in documents.corpora]
        p = sum(weight * counts / max(counts.sum(), 1) for weight, counts in zip(documents.weights, shares))
        counts = p / sum(documents.weights)
    else:
        counts = _token_counts(documents, tokenizer)
    total = counts.sum()
    if total == 0:
        raise DataError("the documents have no tokens")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _token_counts(documents: list[str | Instruction] | TokenizedDocuments, tokenizer: Tokenizer) -> np.ndarray:
    """How often each token id occurs in `documents`: [vocab_size] int64 (the manifests' counts
    for pre-tokenized ones: no pass over the corpus)."""
    if isinstance(documents, TokenizedDocuments):
        return documents.token_counts()
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for doc in documents:
        counts += np.bincount(document_tokens(doc, tokenizer)[0], minlength=tokenizer.vocab_size)
    return counts
