"""Pre-tokenized corpora: token ids written once as sharded ArrayRecord files, then read many times.

A corpus directory (what `seqmix data tokenize` writes) holds
  manifest.json         format and version, document and token counts, dtype, the tokenizer (its
                        path and SHA-256), and the shards with their document and token counts;
  tokens-NNNNN.array_record   one record per document, in order: its token ids as the raw
                        little-endian bytes of `dtype` (uint16 when the vocabulary fits, else int32),
                        written with group_size 1 for random access (grain's ArrayRecordDataSource);
  lengths.npy           [documents] uint32, the tokens of each document: the loader cuts its pieces
                        from these without reading a record;
  token_counts.npy      [vocab_size] int64, how often each id occurs: the unigram baseline, without
                        a pass over the corpus.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from seqmix.train.data.errors import DataError
from seqmix.train.data.sources import expand_paths, read_file
from seqmix.train.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_sha256

FORMAT, VERSION = "seqmix-tokenized", 1
MANIFEST, LENGTHS, COUNTS = "manifest.json", "lengths.npy", "token_counts.npy"
DEFAULT_SHARD_TOKENS = 2**27  # about 256 MiB of uint16 ids a shard
_CHUNK_CHARS = 1 << 18  # characters of text a worker tokenizes per task


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


# --- writing -----------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None  # each tokenizing process loads its own


def _load_worker_tokenizer(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode_chunk(documents: list[str]) -> list[np.ndarray]:
    """The token ids of each document, int32 [n_tokens] each (run in a worker, or in this process)."""
    return [_worker_tokenizer.encode(doc) for doc in documents]


def _chunks(documents: list[str]) -> Iterator[list[str]]:
    """Consecutive runs of documents of about _CHUNK_CHARS characters (at least one document)."""
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends documents to tokens-NNNNN.array_record files of about `shard_tokens` tokens each
    (a document is never split: a shard closes once it holds shard_tokens or more)."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self._directory, self._dtype, self._shard_tokens = directory, dtype, shard_tokens
        self._writer = None
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            name = f"tokens-{len(self.shards):05d}.array_record"
            self._writer = array_record_module.ArrayRecordWriter(str(self._directory / name), "group_size:1")
            self.shards.append({"file": name, "documents": 0, "tokens": 0})
        self._writer.write(tokens.astype(self._dtype).tobytes())
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["tokens"] += len(tokens)
        if shard["tokens"] >= self._shard_tokens:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tokenize_corpus(paths: list[str], tokenizer: str, out: str | Path, *, text_field: str = "text",
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1) -> dict:
    """Tokenizes the documents of `paths` (files or globs, read as `read_documents` reads them) with
    the tokenizer `tokenizer` ("byte" or a tokenizer.json) into a new corpus directory `out`, and
    returns its manifest. `workers` processes tokenize (1: this one); documents keep their order,
    so the corpus does not depend on `workers`. A progress bar shows on a terminal. The directory
    appears whole or not at all (written beside it, then renamed); an existing `out` that is not
    an empty directory raises DataError, as do unreadable inputs (naming the file)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty directory; tokenize into a new one")
    files = expand_paths(paths)
    if not files:
        raise DataError("no input file to tokenize")
    vocab_size, sha256 = load_tokenizer(tokenizer).vocab_size, tokenizer_sha256(tokenizer)
    dtype = token_dtype(vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        shards, lengths, counts = _write_shards(files, tokenizer, staging, dtype, vocab_size, text_field=text_field,
                                                shard_tokens=shard_tokens, workers=workers)
        np.save(staging / LENGTHS, lengths)
        np.save(staging / COUNTS, counts)
        where = tokenizer if tokenizer == "byte" else str(Path(tokenizer).resolve())
        manifest = {"format": FORMAT, "version": VERSION, "documents": len(lengths),
                    "tokens": int(lengths.sum(dtype=np.int64)), "dtype": dtype.name,
                    "tokenizer": {"path": where, "sha256": sha256, "vocab_size": vocab_size},
                    "shards": shards, "inputs": files, "text_field": text_field}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above): rename cannot replace it on every system
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_shards(files: list[str], tokenizer: str, directory: Path, dtype: np.dtype, vocab_size: int, *,
                  text_field: str, shard_tokens: int, workers: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(shards, lengths [documents] uint32, token counts [vocab_size] int64) of the written corpus."""
    writer, lengths, counts = _ShardWriter(directory, dtype, shard_tokens), [], np.zeros(vocab_size, np.int64)
    # Forked before this process tokenizes or starts the progress bar's thread. Workers started
    # afresh (spawn, forkserver) would re-import the caller's main module: seconds each, and
    # recursion in a script without a `__main__` guard.
    pool = (multiprocessing.get_context("fork").Pool(workers, _load_worker_tokenizer, (tokenizer,))
            if workers > 1 else None)
    if pool is None:
        _load_worker_tokenizer(tokenizer)
    bar = tqdm(total=0, unit="doc", disable=not sys.stderr.isatty(), desc="tokenizing")
    try:
        for file in files:
            documents = read_file(file, text_field)
            bar.total += len(documents)
            chunks = _chunks(documents)
            for encoded in pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks):
                for tokens in encoded:
                    writer.add(tokens)
                lengths.append(np.array([len(tokens) for tokens in encoded], np.uint32))
                if any(len(tokens) for tokens in encoded):
                    counts += np.bincount(np.concatenate(encoded), minlength=vocab_size)
                bar.update(len(encoded))
                bar.set_postfix(tokens=int(counts.sum()), refresh=False)
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.terminate()
    return writer.shards, np.concatenate(lengths) if lengths else np.zeros(0, np.uint32), counts


# --- reading -----------------------------------------------------------------------------------

def read_manifest(directory: str | Path) -> dict:
    """The manifest of a corpus directory; DataError naming the directory when it is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory}: not a pre-tokenized corpus (no {MANIFEST}; write one with "
                        "`seqmix data tokenize`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: format version {manifest.get('version')!r}, this seqmix reads version {VERSION}")
    missing = [key for key in ("documents", "tokens", "dtype", "tokenizer", "shards") if key not in manifest]
    if missing:
        raise DataError(f"{path}: no {missing[0]!r} entry (a partial or hand-edited manifest?)")
    return manifest


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


class TokenizedDocuments(Sequence):
    """The documents of one or more pre-tokenized corpus directories, in order, read on demand:
    element d is the token ids of document d, int32 [lengths[d]].

    `tokenizer` is the run's tokenizer spec; every directory must have been tokenized with a file
    of the same SHA-256 (DataError naming both otherwise).
    """

    def __init__(self, directories: list[str], tokenizer: str):
        if not directories:
            raise DataError("no pre-tokenized corpus directory given")
        sha256 = tokenizer_sha256(tokenizer)
        shard_files, lengths, counts, dtypes = [], [], [], set()
        for directory in directories:
            manifest = read_manifest(directory)
            recorded = manifest["tokenizer"]
            if recorded["sha256"] != sha256:
                raise DataError(f"{directory}: tokenized with {recorded['path']!r} (sha256 {recorded['sha256'][:16]}), "
                                f"but the run's tokenizer is {tokenizer!r} (sha256 {sha256[:16]}): use that tokenizer "
                                "(data.tokenizer) or tokenize the corpus again")
            dirlengths = _load_array(Path(directory) / LENGTHS)
            if len(dirlengths) != manifest["documents"] or int(dirlengths.sum(dtype=np.int64)) != manifest["tokens"]:
                raise DataError(f"{directory}: {LENGTHS} does not match {MANIFEST} (a partial copy?)")
            shard_files += [str(Path(directory) / shard["file"]) for shard in manifest["shards"]]
            lengths.append(dirlengths.astype(np.int64))
            counts.append(_load_array(Path(directory) / COUNTS))
            dtypes.add(manifest["dtype"])
        self.lengths = np.concatenate(lengths)  # [documents] int64
        self._counts = np.sum(counts, axis=0)
        self._dtype = np.dtype(dtypes.pop()).newbyteorder("<")  # one tokenizer, so one dtype
        missing = [file for file in shard_files if not os.path.isfile(file)]
        if missing:
            raise DataError(f"{missing[0]}: shard listed in the manifest is missing")
        self._records = grain.sources.ArrayRecordDataSource(shard_files)
        if len(self._records) != len(self.lengths):
            raise DataError(f"{', '.join(directories)}: the shards hold {len(self._records)} documents, the manifests "
                            f"say {len(self.lengths)}")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.stored(index).astype(np.int32)

    def stored(self, index: int) -> np.ndarray:
        """Document `index`'s ids as stored, [lengths[index]] of the manifest's dtype, read-only:
        what a reader that needs only a slice of the document casts, not the whole."""
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"document {index} of {len(self.lengths)}")
        return np.frombuffer(self._records[index], self._dtype)

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs in these documents: int64 [vocab_size]."""
        return self._counts
