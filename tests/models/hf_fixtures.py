"""What the models' tests share: the fixtures that transformers made (tests/fixtures/hf/), the
relative error, and a jitted forward."""

import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@nnx.jit
def logits_of(model, tokens):
    """The full forward's logits, jitted: a model compiled whole costs less than one run op by op,
    which compiles each operation of each shape on its own; models of one structure share the
    compilation."""
    return model(tokens)


def hf_json(name):
    """A fixture's config.json, parsed."""
    return json.loads((FIXTURES / name / "config.json").read_text())


def copy_fixture(name, tmp_path):
    """A writable copy of a fixture directory under tmp_path."""
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target
