"""Config loading: every error names the offending dotted key, before anything is compiled."""

import dataclasses
from pathlib import Path

import jax
import pytest
from flax import nnx

from seqmix.configuration import ConfigError, apply_overrides, build, load_yaml, to_dict
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.config import TrainConfig, load_train_config


def test_run_config_with_model_path_and_overrides():
    config = load_train_config("configs/runs/shakespeare.yaml", ["optim.lr=3e-4", "model.n_layers=8", "data.tokenizer=byte"])
    assert config.optim.lr == 3e-4 and config.model.n_layers == 8
    assert config.model.d_model == 128  # from configs/models/hybrid_small.yaml
    assert build(TrainConfig, to_dict(config)) == config


def test_a_model_file_override_swaps_the_model_before_its_fields_are_set():
    config = load_train_config("configs/runs/shakespeare.yaml",
                               ["model.n_layers=8", "model=../models/transformer_small.yaml"])
    assert config.model.layer_pattern == ["attention"] and config.model.n_layers == 8
    config = load_train_config("configs/runs/shakespeare.yaml", ["model=configs/models/gla_small.yaml"])
    assert config.model.layer_pattern == ["gla"]
    with pytest.raises(ConfigError, match="model config 'nowhere.yaml' not found"):
        load_train_config("configs/runs/shakespeare.yaml", ["model=nowhere.yaml"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["model.n_layer=2"], "model.n_layer"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.n_layers=2.5"], "model.n_layers"),
        (["model.tie_embeddings=3"], "model.tie_embeddings"),
        (["optim.schedule=exponential"], "optim.schedule"),
        (["model.d_model=250", "model.n_heads=8"], "model.d_model"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.n_layers=3"], "model.n_layers"),
        (["model.layer_pattern=[attention, mamba9]"], "model.layer_pattern"),
        (["model.mixers.local.sliding_window=0"], "model.mixers.local.sliding_window"),
        (["model.mixers.local.window=8"], "model.mixers.local.window"),
        (["optim.lr=-1"], "optim.lr"),
        (["data.seq_len=1"], "data.seq_len"),
        (["mesh.fsdp=0"], "mesh.fsdp"),
        (["model.vocab_size=100"], "model.vocab_size"),
        (["optim.warmup_steps=100000"], "optim.warmup_steps"),
        (["steps.x=1"], "steps"),
        (["model.mlp_activation=relu"], "model.mlp_activation"),
        (["model.mlp_multipliers=[2.0]"], "model.mlp_multipliers"),
        (["model.logit_soft_cap=0"], "model.logit_soft_cap"),
        (["model.residual_scales={mamba2: [1, 1, 1, 1]}"], "model.residual_scales"),
        (["model.residual_scales={local: [1, 1]}"], "model.residual_scales.local"),
        (["model.mlp_hidden=0", "model.moe={num_experts: 4}"], "model.moe"),
        (["lora={init: svd}"], "lora.init"),
        (["model.mixers.local={type: moe, every: 2}"], "model.mixers.local.every"),  # a layer of experts
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_train_config("configs/runs/smoke.yaml", overrides)
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize("override, home", [("imports=[my_mixer.py]", "model.imports"), ("lr=1e-3", "optim.lr"),
                                            ("seq_len=64", "data.seq_len")])
def test_a_key_given_outside_its_section_is_pointed_to_it(override, home):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: unknown key \(did you mean {home}\? valid keys"):
        load_train_config("configs/runs/smoke.yaml", [override])
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key \(valid keys of optim: "):  # no home: no guess
        load_train_config("configs/runs/smoke.yaml", ["optim.lrr=1"])


def test_unknown_mixer_type_names_its_kind():
    with pytest.raises(ConfigError, match=r"^model\.mixers\.local\.type: unknown mixer 'nope'"):
        load_train_config("configs/runs/smoke.yaml", ["model.mixers.local.type=nope"])


def test_unused_mixer_kind_is_an_error():
    with pytest.raises(ConfigError, match=r"^model\.mixers\.extra"):
        build(ModelConfig, {"mixers": {"extra": {"type": "attention"}}}, "model")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")
    run = tmp_path / "run.yaml"
    run.write_text("model: models/missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_train_config(run)
    run.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_train_config(run)


def test_overrides_parse_yaml_values():
    mapping = apply_overrides({}, ["a.b=3", "a.c=[x, y]", "d=null", "e=true"])
    assert mapping == {"a": {"b": 3, "c": ["x", "y"]}, "d": None, "e": True}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["novalue"])


def test_layer_kinds_repeat_the_pattern():
    config = build(ModelConfig, {"n_layers": 8, "layer_pattern": ["a", "a", "a", "b"],
                                 "mixers": {"a": {"type": "attention", "sliding_window": 4},
                                            "b": {"type": "attention"}}})
    assert config.layer_kinds() == ["a", "a", "a", "b"] * 2
    spec, options = config.mixer("a")
    assert spec.name == "attention" and options.sliding_window == 4
    assert dataclasses.replace(config, n_kv_heads=2).kv_heads == 2


@pytest.mark.parametrize("path", sorted(Path("configs/models").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_builds_a_model(path):
    config = build(ModelConfig, load_yaml(path), str(path))
    config.validate(str(path))
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
