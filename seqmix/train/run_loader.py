"""A trained run's model, for inference: built from the run's resolved config and given the
parameters of its newest complete checkpoint, without the trainer (no optimizer state, no
training data, no train step).

    model, config = seqmix.load_run("runs/smoke")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from seqmix.configuration import ConfigError
from seqmix.layers.partitioning import using_rules
from seqmix.models.lm import LanguageModel
from seqmix.train.checkpoint import Checkpointer, CheckpointsUnreadable
from seqmix.train.config import TrainConfig, load_train_config
from seqmix.train.sharding import make_mesh
from seqmix.train.state import abstract_on_mesh, run_model


@dataclasses.dataclass
class LoadedRun:
    """A run's model (LoRA adapters, if the run has them, still separate: `merge_lora`) on `mesh`,
    at checkpoint `step`; `rng`: the run's random key as the checkpoint saved it."""

    model: LanguageModel
    config: TrainConfig
    step: int
    rng: jax.Array
    mesh: Mesh


def run_directory(path: str | Path) -> Path:
    """A run directory from a path to it or to its `checkpoints/` folder."""
    run_dir = Path(path)
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a seqmix run directory (no config.yaml; expected the out_dir of `seqmix train`)")
    return run_dir


def open_run(path: str | Path, overrides: list[str] = ()) -> LoadedRun:
    """The model of the run in `path` (its out_dir or its checkpoints/ folder) with the parameters
    of its newest checkpoint that restores (an unreadable one is reported on stderr and the one
    before tried), on a mesh of every device (data=-1; the run's other mesh axes kept).
    overrides: dotted overrides of the run's config (e.g. eval_batches=4). A path that is no run
    directory, a run without checkpoints and one whose checkpoints all fail are ConfigErrors."""
    run_dir = run_directory(path)
    config = load_train_config(run_dir / "config.yaml", [f"out_dir={run_dir}", "mesh.data=-1", *overrides])
    mesh = make_mesh(config.mesh)
    with using_rules(config.mesh.rules):  # the parameters placed as the run placed them
        graphdef, abstract, _shardings = abstract_on_mesh(lambda: run_model(config), mesh)
    directory = run_dir / "checkpoints"
    restored = _restore_model(directory, abstract) if directory.is_dir() else None
    if restored is None:
        raise ConfigError(f"{run_dir}: no checkpoint in {directory} (the run has not saved one yet)")
    step, state, metadata = restored
    rng = jax.random.wrap_key_data(np.asarray(metadata["rng"], np.uint32))
    return LoadedRun(nnx.merge(graphdef, state[0]), config, step, rng, mesh)


def _restore_model(directory: Path, abstract: nnx.State):
    """(step, {0: model state}, metadata) of the newest checkpoint in `directory` that restores,
    or None if there is none: of the train state saved, (model, optimizer), only item 0 is read."""
    checkpointer = Checkpointer(directory)
    try:
        return checkpointer.restore({0: abstract}, partial=True)
    except CheckpointsUnreadable as err:
        raise ConfigError(f"{directory.parent}: {err}") from None
    finally:
        checkpointer.close()


def load_run(path: str | Path) -> tuple[LanguageModel, TrainConfig]:
    """(model, config) of the run in `path` (`open_run`): the model with its newest checkpoint's
    parameters, and the run's resolved config (its tokenizer: `load_tokenizer(config.data.tokenizer)`)."""
    run = open_run(path)
    return run.model, run.config
