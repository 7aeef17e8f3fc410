"""Files written whole or not at all: what seqmix writes into a run or model directory is first
written under a temporary name beside it and renamed into place, so a crash, a full disk or a
signal never leaves a half-written file under the final name, and renaming replaces a symbolic
link itself instead of writing through it out of the directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(directory: Path, file_name: str, writer: Callable[[str], None]) -> None:
    """`writer(path)` writes a temporary file in `directory`, renamed to `file_name` once complete."""
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{file_name}.")
    os.close(handle)
    try:
        writer(temporary)
        os.replace(temporary, directory / file_name)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
