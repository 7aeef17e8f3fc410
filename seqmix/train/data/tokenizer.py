"""Tokenizers: text <-> int32 token ids.

`ByteTokenizer` (the UTF-8 bytes, 256 symbols) is built in; `HFTokenizer` wraps a Hugging Face
`tokenizer.json`. `load_tokenizer` picks one from the config string.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers

from seqmix.train.data.errors import DataError


class Tokenizer(Protocol):
    """What the data pipeline and the sampler need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`: int32, shape [n_tokens]."""
        ...

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (any integer array-like, shape [n_tokens])."""
        ...


class ByteTokenizer:
    """The UTF-8 bytes of the text as tokens: vocab_size 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of `text`: int32 array of shape [n_bytes], values in [0, 256)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of byte ids (shape [n]); invalid UTF-8 and ids outside [0, 256) become U+FFFD."""
        ids = np.asarray(ids, np.int64).ravel()
        # A model's vocabulary may be larger than 256; 0xFF never occurs in UTF-8, so an
        # out-of-range id decodes to the replacement character like any other invalid byte.
        in_range = (ids >= 0) & (ids < 256)
        raw = np.where(in_range, ids, 0xFF).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json file.

    Encoding adds no special tokens (no BOS/EOS): documents are separated by segment ids.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files
            raise DataError(f"{self.path}: cannot load tokenizer: {e}") from e
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`: int32 array of shape [n_tokens]."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        """Text of token ids (any integer array-like of shape [n_tokens])."""
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` gives the byte tokenizer; anything else is the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def tokenizer_sha256(spec: str) -> str:
    """The identity of a tokenizer, as hex SHA-256: of the tokenizer.json file's bytes, or of the
    string "byte" for the byte tokenizer. A pre-tokenized corpus records it, so that a run reading
    the corpus with another tokenizer fails instead of training on ids that mean other text."""
    if spec == "byte":
        return hashlib.sha256(b"byte").hexdigest()
    try:
        return hashlib.sha256(Path(spec).read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{spec}: cannot read tokenizer: {e.strerror}") from e
