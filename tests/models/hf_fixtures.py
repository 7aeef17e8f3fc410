"""What the Hugging Face tests share: the fixtures that transformers made (tests/fixtures/hf/)."""

import json
import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def hf_json(name):
    """A fixture's config.json, parsed."""
    return json.loads((FIXTURES / name / "config.json").read_text())


def copy_fixture(name, tmp_path):
    """A writable copy of a fixture directory under tmp_path."""
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target
