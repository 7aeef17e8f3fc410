"""Layer selection by KL: in a teacher whose middle layer alone does any attending (the other two
layers' attention outputs are zeroed), linearizing an idle layer costs nothing and linearizing the
middle one costs KL, so `seqmix linearize --select-layers 1` keeps the middle layer as attention."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seqmix.cli import main
from seqmix.configuration import ConfigError, build, load_yaml
from seqmix.models.config import ModelConfig
from seqmix.models.hf import save_pretrained
from seqmix.models.lm import LanguageModel
from seqmix.train.layer_selection import linearization_kl, select_layers

CONFIG = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 2, "init_std": 0.3}, "model")


def planted_teacher() -> LanguageModel:
    teacher = LanguageModel(CONFIG, rngs=nnx.Rngs(0))
    for idle in (0, 2):
        kernel = teacher.layers[idle].self_attn.o_proj.kernel
        kernel.set_value(jnp.zeros_like(kernel[...]))
    return teacher


def test_the_layer_that_attends_scores_highest_and_is_kept():
    tokens = jax.random.randint(jax.random.key(0), (2, 48), 0, 256)
    segment_ids = jnp.concatenate([jnp.ones((2, 30), jnp.int32), jnp.full((2, 18), 2, jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(30), jnp.arange(18)])[None].repeat(2, axis=0)
    batch = {"inputs": tokens, "segment_ids": segment_ids, "positions": positions}
    scores = linearization_kl(planted_teacher(), CONFIG, "liger_gla", [batch])
    assert list(scores) == [0, 1, 2]
    assert scores[0] < 1e-6 and scores[2] < 1e-6 and scores[1] > 1e-3, scores
    assert select_layers(scores, 1) == [1]


def test_selection_keeps_the_highest_scores_in_layer_order():
    assert select_layers({0: 0.5, 1: 0.1, 2: 0.5, 3: 0.7}, 2) == [0, 3]
    with pytest.raises(ConfigError, match="--select-layers: keep between 1 and 3 of the 4 attention layers, got 4"):
        select_layers({0: 0.5, 1: 0.1, 2: 0.5, 3: 0.7}, 4)


def test_linearize_selects_layers_from_the_command_line(tmp_path, capsys):
    save_pretrained(planted_teacher(), CONFIG, tmp_path / "teacher")
    run = tmp_path / "run"
    assert main(["linearize", str(tmp_path / "teacher"), "--method", "liger_gla", "--select-layers", "1",
                 "--calibration-batches", "1", "steps=1", f"out_dir={run}", "eval_every=1", "eval_batches=1",
                 "sample_tokens=4", "data.seq_len=32", "data.batch_size=8", "optim.warmup_steps=1",
                 "checkpoint.every_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "over 1 batches: 0: " in out and "; kept as attention: 1\n" in out and "--- sample ---" in out
    layers = load_yaml(run / "config.yaml")["model"]["layer_pattern"]
    assert layers == ["liger_gla_attention", "attention", "liger_gla_attention"]
    assert main(["linearize", str(tmp_path / "teacher"), "--method", "liger_gla", "--select-layers", "1",
                 "--keep", "0"]) == 2
    assert "do not also give --keep" in capsys.readouterr().err
