"""Read documents from text, JSON lines and parquet files."""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from seqmix.train.data.errors import DataError


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """The documents of every file that `paths` names, in order (the matches of a glob sorted).

    Each entry is a file or a glob pattern (`**` recurses). A `.jsonl` file gives one document per
    line (the string field `text_field` of a JSON object), a `.parquet` file one per row (column
    `text_field`), any other file one document (its whole UTF-8 text). Empty documents are
    skipped. Raises DataError, naming the file (and line), when an entry matches no file, a file
    yields no non-empty document, is not valid UTF-8, or lacks the field or column.
    """
    return [doc for file in expand_paths(paths) for doc in read_file(file, text_field)]


def expand_paths(paths: list[str]) -> list[str]:
    """The files that `paths` (files or glob patterns, `**` recursing) name, in order, the matches
    of each pattern sorted; DataError when an entry matches no file."""
    files = []
    for pattern in paths:
        matches = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not matches:
            raise DataError(f"{pattern}: matches no file")
        files.extend(matches)
    return files


def read_file(file: str, text_field: str = "text") -> list[str]:
    """The non-empty documents of one file, read by its extension as `read_documents` says."""
    if file.endswith(".parquet"):
        docs = _read_parquet(file, text_field)
    elif file.endswith(".jsonl"):
        docs = _read_jsonl(file, text_field)
    else:
        docs = [_decode(file, _read_bytes(file))]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{file}: contains no non-empty document")
    return docs


def _read_bytes(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{file}: cannot read: {e.strerror}") from e


def _decode(file: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{file}: line {line}: invalid UTF-8 at byte offset {e.start}") from e


def _read_jsonl(file: str, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_decode(file, _read_bytes(file)).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}: line {lineno}: invalid JSON: {e.msg}") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{file}: line {lineno}: no string field {text_field!r}")
        docs.append(record[text_field])
    return docs


def _read_parquet(file: str, text_field: str) -> list[str]:
    try:
        schema = pq.read_schema(file)
        if text_field not in schema.names:
            raise DataError(f"{file}: no column {text_field!r} (columns: {schema.names})")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{file}: column {text_field!r} has type {kind}, not string")
        column = pq.read_table(file, columns=[text_field]).column(text_field)
        return [doc for doc in column.to_pylist() if doc is not None]
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read parquet: {e}") from e
