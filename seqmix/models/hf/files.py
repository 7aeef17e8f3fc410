"""A pretrained-model directory's files read with errors that name them: its config.json and its
safetensors files (written by `seqmix.files.write_atomically`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

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


class SafetensorsFile:
    """A safetensors file open for reading, whose failures (a torn or foreign file, a tensor whose
    bytes are cut short) raise CheckpointError naming the file and tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = safe_open(path, framework="flax")
        except Exception as err:  # safetensors raises its own error types, and OSError
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, name: str):
        try:
            return self._handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.path}: tensor {name} cannot be read ({err})") from None
