"""seqmix's own pretrained format (`seqmix.models.hf.seqmix_format`): what no Hugging Face config
describes (a LoLCATs layer with its learned feature maps, a GLA layer with a learned initial state,
beside attention) saves and reloads through `seqmix.from_pretrained` with the same logits; a model
is never saved under a config that does not describe it; a torn or foreign directory is refused by
file and tensor."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import seqmix
from seqmix.configuration import build
from seqmix.mixers.state_tuning import InitialState
from seqmix.models.config import ModelConfig
from seqmix.models.hf import CheckpointError, export_pretrained, save_pretrained
from seqmix.models.linearize import linearize
from seqmix.models.lm import LanguageModel
from seqmix.models.lora import add_lora

OPTIONS = {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 2, "init_std": 0.2,
           "layer_pattern": ["lolcats", "gla", "attention"], "mixers": {"lolcats": {"window": 4}},
           "learned_initial_state": True}
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def student():
    """(model, config): every parameter random, the learned states and feature maps included."""
    config = build(ModelConfig, OPTIONS, "model")
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(key, x.shape)
                                                for x, key in zip(leaves, keys)]))
    assert jax.tree.leaves(nnx.state(model, InitialState))
    return model, config


def test_a_student_no_hugging_face_config_holds_round_trips_with_equal_logits(tmp_path):
    model, config = student()
    written = export_pretrained(model, config, tmp_path / "f32")
    assert written == "seqmix (no Hugging Face model_type holds this model; --format hf says why)"
    assert np.array_equal(seqmix.from_pretrained(tmp_path / "f32")(TOKENS), model(TOKENS))
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["model"]["layer_pattern"] == OPTIONS["layer_pattern"]
    export_pretrained(model, config, tmp_path / "bf16", form="seqmix", dtype=jnp.bfloat16)
    loaded = seqmix.from_pretrained(tmp_path / "bf16")  # float32, from the bfloat16 tensors
    assert loaded.layers[1].self_attn.initial_state[...].dtype == jnp.float32
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(model, nnx.Param))
    nnx.update(model, rounded)
    assert np.array_equal(loaded(TOKENS), model(TOKENS))
    with pytest.raises(CheckpointError, match="no Hugging Face format seqmix exports:\n  llama/mistral/qwen2: "):
        export_pretrained(model, config, tmp_path / "hf", form="hf")


def test_an_attention_model_exports_in_the_hugging_face_layout(tmp_path):
    config = build(ModelConfig, {**OPTIONS, "layer_pattern": ["attention"], "mixers": {},
                                 "learned_initial_state": False}, "model")
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    assert export_pretrained(model, config, tmp_path) == "hf (llama)"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert np.allclose(seqmix.from_pretrained(tmp_path)(TOKENS), model(TOKENS), atol=1e-5)


def test_a_model_is_never_saved_under_a_config_that_does_not_describe_it(tmp_path):
    config = build(ModelConfig, {**OPTIONS, "layer_pattern": ["attention"], "mixers": {},
                                 "learned_initial_state": False}, "model")
    teacher = LanguageModel(config, rngs=nnx.Rngs(0))
    converted, student_config = linearize(teacher, config, "liger_attention")
    # Its projections have the teacher's names: under the teacher's config it would reload as softmax attention.
    with pytest.raises(CheckpointError, match="layers.0.self_attn is a LigerAttention, where the config builds "
                                              "layers.0.self_attn, a Attention"):
        save_pretrained(converted, config, tmp_path)
    add_lora(converted, rngs=nnx.Rngs(1))
    with pytest.raises(CheckpointError, match="LoRA adapters .* merge them"):
        export_pretrained(converted, student_config, tmp_path)
    assert not tmp_path.joinpath("config.json").exists()


def rewritten(tmp_path, edit_tensors=None, edit_config=None):
    model, config = student()
    export_pretrained(model, config, tmp_path, form="seqmix")
    if edit_tensors:
        tensors = load_file(tmp_path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, tmp_path / "model.safetensors")
    if edit_config:
        document = json.loads((tmp_path / "config.json").read_text())
        edit_config(document)
        (tmp_path / "config.json").write_text(json.dumps(document))
    return tmp_path


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (lambda t: t.pop("layers.1.self_attn.initial_state"), None,
     r"model.safetensors: tensor layers.1.self_attn.initial_state \(2, 8, 16\) is missing"),
    (lambda t: t.update({"layers.9.stray": np.zeros(2, np.float32)}), None,
     "model.safetensors: tensor layers.9.stray has no place in the model"),
    (lambda t: t.update({"norm.weight": np.zeros(3, np.float32)}), None,
     r"model.safetensors: tensor norm.weight is float32 \(3,\), expected a float tensor of shape \(32,\)"),
    (None, lambda d: d.update(format_version=2), "config.json: format_version 2"),
    (None, lambda d: d["model"].update(n_layer=2), "config.json: model.n_layer: unknown key"),
])
def test_a_torn_or_foreign_directory_is_refused_by_file_and_tensor(tmp_path, edit_tensors, edit_config, message):
    directory = rewritten(tmp_path, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=message):
        seqmix.from_pretrained(directory)
