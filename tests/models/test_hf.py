"""Hugging Face import/export against fixtures that transformers itself made
(tests/fixtures/hf/make_fixtures.py): tiny random Llama (GQA, Llama-3 RoPE scaling, sharded),
Mistral (sliding window 5) and Qwen2 (q/k/v biases, tied embeddings) and their logits."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import FIXTURES, copy_fixture, hf_json, rel_err
from safetensors.numpy import load_file, save_file

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.hf import CheckpointError, config_from_hf, from_pretrained, hf_config, save_pretrained
from seqmix.models.lm import LanguageModel




def expected(name):
    files = load_file(FIXTURES / name / "expected.safetensors")
    return jnp.asarray(files["input_ids"], jnp.int32), files["logits"]



@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_fixture_logits_match_transformers(name):
    tokens, logits = expected(name)
    assert rel_err(from_pretrained(FIXTURES / name)(tokens), logits) < 1e-5


def test_public_entry_point_loads_in_bfloat16():
    import seqmix

    model = seqmix.from_pretrained(FIXTURES / "llama", dtype=jnp.bfloat16)
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    tokens, logits = expected("llama")
    assert rel_err(model(tokens), logits) < 3e-2


def test_the_fixtures_exercise_the_window_the_rope_scaling_and_the_biases():
    """Each feature changes the logits: loading without it would not pass the parity test."""
    for name, change in [("mistral", lambda c: dataclasses.replace(
                              c, mixers={k: {**v, "sliding_window": None} for k, v in c.mixers.items()})),
                         ("llama", lambda c: dataclasses.replace(c, rope_scaling=None))]:
        tokens, logits = expected(name)
        loaded = from_pretrained(FIXTURES / name)
        plain = LanguageModel(change(config_from_hf(hf_json(name))), rngs=nnx.Rngs(0))
        nnx.update(plain, nnx.state(loaded, nnx.Param))
        assert rel_err(plain(tokens), logits) > 1e-3, name
    qwen2 = from_pretrained(FIXTURES / "qwen2")
    assert float(jnp.abs(qwen2.layers[0].self_attn.k_proj.bias[...]).max()) > 0.1
    assert qwen2.lm_head is None  # tied embeddings


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_export_and_reimport_keep_the_model(tmp_path, name):
    model = from_pretrained(FIXTURES / name)
    config = config_from_hf(hf_json(name))
    save_pretrained(model, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == name
    assert config_from_hf(exported) == config
    tokens, logits = expected(name)
    assert rel_err(from_pretrained(tmp_path)(tokens), logits) < 1e-5
    original = load_file(next(FIXTURES.glob(f"{name}/model*.safetensors"))) if name != "llama" else None
    if original is not None:
        written = load_file(tmp_path / "model.safetensors")
        assert set(written) == set(original) and all(np.array_equal(written[k], original[k]) for k in original)



def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    directory = copy_fixture("mistral", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        from_pretrained(directory)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})

    config = hf_json("mistral") | {"vocab_size": 100}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight has shape \(96, 64\), expected \(100, 64\)"):
        from_pretrained(directory)


def test_unexpected_tensors_missing_shards_and_unsupported_configs_are_refused(tmp_path):
    directory = copy_fixture("qwen2", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)},
              directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.bias has no place"):
        from_pretrained(directory)

    sharded = copy_fixture("llama", tmp_path)
    (sharded / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00006.safetensors"):
        from_pretrained(sharded)

    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(CheckpointError, match="rope_type 'yarn' is not supported"):
        config_from_hf(hf_json("llama") | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2}})
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf(hf_json("llama") | {"attention_bias": True})


def test_only_attention_models_export():
    config = build(ModelConfig, {"d_model": 32, "n_heads": 2, "n_layers": 2,
                                 "layer_pattern": ["gated_deltanet", "attention"]}, "model")
    with pytest.raises(CheckpointError, match="model.layers.0: a 'gated_deltanet' layer"):
        hf_config(config)


def test_windows_that_vary_by_layer_export_as_qwen2_layer_types():
    config = build(ModelConfig, {"d_model": 32, "n_heads": 2, "n_layers": 2, "layer_pattern": ["local", "global"],
                                 "mixers": {"local": {"type": "attention", "sliding_window": 8},
                                            "global": {"type": "attention"}}}, "model")
    exported = hf_config(config)
    assert exported["model_type"] == "qwen2" and exported["layer_types"] == ["sliding_attention", "full_attention"]
    reread = config_from_hf(exported)
    assert [reread.mixer(kind)[1].sliding_window for kind in reread.layer_kinds()] == [8, None]


@pytest.mark.parametrize("options, message", [
    ({"mixers": {"a": {"type": "attention", "output_gate": True}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with output_gate = True has no Llama"),
    ({"mixers": {"a": {"type": "attention", "qk_norm": "head", "rotary_fraction": 0.5}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with qk_norm = .head. has no Llama"),
    ({"moe": {"num_experts": 4}}, r"model\.moe: .* has no Llama"),
    ({"norm_unit_offset": True}, r"model\.norm_unit_offset: .* has no Llama"),
    ({"post_norm_layers": ["attention"]}, r"model\.post_norm_layers: .* has no Llama"),
    ({"logit_soft_cap": 30.0}, r"model\.logit_soft_cap: 30\.0 has no Llama, Mistral or Qwen2 equivalent"),
])
def test_export_refuses_what_the_llama_family_cannot_hold(options, message):
    """Rather than a config.json that transformers would reload as a different model."""
    config = build(ModelConfig, {"vocab_size": 96, "d_model": 32, "n_layers": 1, "n_heads": 2, **options}, "model")
    with pytest.raises(CheckpointError, match=message):
        hf_config(config)
