"""State tuning as a user runs it: `seqmix train configs/runs/finetune.yaml init_from=CHECKPOINT
tune=state data.pack=false lora=null` trains each recurrent layer's initial state alone, on a
transformers-made Mamba-2 checkpoint; the run samples at its end, from the tuned states."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_finetune import FINETUNE, finetune_overrides, train_losses

from seqmix.cli import main
from seqmix.configuration import ConfigError
from seqmix.mixers.state_tuning import InitialState
from seqmix.train.config import load_train_config
from seqmix.train.trainer import Trainer

STATE_TUNING = ["tune=state", "data.pack=false", "lora=null", "optim.lr=3e-2"]


def flat_params(trainer: Trainer) -> dict:
    """{path: (numpy value, is an InitialState)} of the trainer's model."""
    state = nnx.state(trainer.train_state.model(), nnx.Param)
    return {path: (np.asarray(jax.device_get(variable.get_value())), isinstance(variable, InitialState))
            for path, variable in nnx.to_flat_state(state)}


def test_state_tuning_changes_only_the_states_and_beats_the_frozen_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", FINETUNE, *finetune_overrides(tmp_path, "mamba2"), *STATE_TUNING]) == 0
    assert "--- sample ---\nROMEO:" in capsys.readouterr().out
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.3, losses
    assert "learned_initial_state: true" in (run / "config.yaml").read_text()  # generate/eval rebuild the states

    # The run rebuilt as `seqmix generate` does: first as it started (the checkpoint's weights,
    # zero states: the frozen model), then restored.
    trainer = Trainer(load_train_config(run / "config.yaml", [f"out_dir={run}"]))
    frozen, frozen_loss = flat_params(trainer), trainer.evaluate()["eval_loss"]
    trainer.restore_latest()
    tuned, tuned_loss = flat_params(trainer), trainer.evaluate()["eval_loss"]
    assert sum(is_state for _, is_state in frozen.values()) == 2  # one per Mamba-2 layer of the fixture
    for path, (value, is_state) in tuned.items():
        if is_state:
            assert not np.any(frozen[path][0]) and np.any(value), path
        else:
            assert np.array_equal(value, frozen[path][0]), path
    assert tuned_loss < frozen_loss - 0.3, (tuned_loss, frozen_loss)  # on the tuning data (eval = train file)


@pytest.mark.parametrize("overrides, key", [
    (["tune=state", "lora=null", "model=configs/models/gla_small.yaml"], "data.pack"),
    (["tune=state", "data.pack=false", "model=configs/models/gla_small.yaml"], "lora"),
    (["tune=state", "data.pack=false", "lora=null", "model=configs/models/transformer_tiny.yaml"],
     "learned_initial_state"),
])
def test_state_tuning_refuses_what_it_cannot_train(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_train_config(FINETUNE, overrides)
