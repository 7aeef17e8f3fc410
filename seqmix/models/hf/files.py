"""The files of a pretrained-model directory: its config.json read with errors that name it, and
files written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seqmix.models.hf.tensors import CheckpointError


def read_config(directory: Path) -> dict[str, Any]:
    """The parsed `config.json` of a model directory."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def write_atomically(directory: Path, file_name: str, writer: Callable[[str], None]) -> None:
    """`writer(path)` writes a temporary file in `directory`, renamed to `file_name` once complete,
    so an interrupted export never leaves a half-written file under the final name."""
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{file_name}.")
    os.close(handle)
    try:
        writer(temporary)
        os.replace(temporary, directory / file_name)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
