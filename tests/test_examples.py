"""examples/: the new-mixer example registers its mixer from outside the package, and the stock
trainer trains, evaluates and samples from a model made of it."""

import importlib.util
import math

from seqmix.mixers import registered_mixers
from seqmix.train.config import load_train_config
from seqmix.train.trainer import train


def test_new_mixer_example_trains_with_the_stock_trainer(tmp_path):
    spec = importlib.util.spec_from_file_location("new_mixer", "examples/new_mixer.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "decaying_attention" in registered_mixers()
    config = load_train_config("configs/runs/smoke.yaml", [
        "model.layer_pattern=[decaying_attention]", "model.mixers={}", f"out_dir={tmp_path}", "steps=6",
        "eval_every=6", "checkpoint.every_steps=6", "sample_tokens=8"])
    result = train(config)
    assert result.step == 6 and math.isfinite(result.eval_loss)
    assert result.losses[6] < result.losses[1] and len(result.sample) > 0
