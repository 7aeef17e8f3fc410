"""A pretrained-model directory's config.json, read with errors that name it (its files are
written by `seqmix.files.write_atomically`)."""

from __future__ import annotations

import json
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
