"""Hugging Face import/export against fixtures that transformers itself made
(tests/fixtures/hf/make_fixtures.py): tiny random Llama (GQA, Llama-3 RoPE scaling, sharded),
Mistral (sliding window 5) and Qwen2 (q/k/v biases, tied embeddings) and their logits; the
teachers Qwen3 (per-head q/k norms, a head_dim of its own, a sliding layer, untied) and Gemma
((1 + w) norms, sqrt(hidden) embeddings, GeGLU, a head_dim of its own, q/k/v/o biases, tied),
every tensor perturbed, with transformers' greedy continuation too."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import FIXTURES, copy_fixture, hf_json, rel_err
from safetensors.numpy import load_file, save_file

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.generate import generate
from seqmix.models.hf import CheckpointError, config_from_hf, from_pretrained, hf_config, save_pretrained
from seqmix.models.lm import LanguageModel




def expected(name):
    files = load_file(FIXTURES / name / "expected.safetensors")
    return jnp.asarray(files["input_ids"], jnp.int32), files["logits"]



ATTENTION = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
TEACHERS = ["qwen3", "gemma"]  # fixtures with every tensor perturbed and a greedy continuation


@pytest.mark.parametrize("name", ATTENTION)
def test_fixture_logits_match_transformers(name):
    tokens, logits = expected(name)
    assert rel_err(from_pretrained(FIXTURES / name)(tokens), logits) < 1e-5


@pytest.mark.parametrize("name", TEACHERS)
def test_teachers_continue_greedily_as_transformers_does(name):
    """transformers' own cached `generate`, greedy, through seqmix's decode caches (Qwen3's
    5-token window in a ring cache)."""
    tokens, _ = expected(name)
    greedy = load_file(FIXTURES / name / "expected.safetensors")["greedy"]
    continued = generate(from_pretrained(FIXTURES / name), tokens, greedy.shape[1], rng=jax.random.key(0),
                         temperature=0.0)
    np.testing.assert_array_equal(np.asarray(continued), greedy)


def test_the_teacher_fixtures_exercise_their_options():
    """Loading without one of these would not pass the parity test: Qwen3's q/k norms and its
    window; Gemma's (1 + w) norms, GeGLU and sqrt(hidden) not rounded to bfloat16 (6.9375), which
    transformers 5.24 does only to a bfloat16 model's."""
    def without_qk_norm(config):
        return dataclasses.replace(config, mixers={k: {**v, "qk_norm": None} for k, v in config.mixers.items()})

    variants = {"qwen3": [without_qk_norm, lambda c: dataclasses.replace(
                    c, mixers={k: {**v, "sliding_window": None} for k, v in c.mixers.items()})],
                "gemma": [lambda c: dataclasses.replace(c, norm_unit_offset=False),
                          lambda c: dataclasses.replace(c, mlp_activation="silu"),
                          lambda c: dataclasses.replace(c, embedding_multiplier=6.9375)]}
    for name, changes in variants.items():
        tokens, logits = expected(name)
        params = nnx.to_flat_state(nnx.state(from_pretrained(FIXTURES / name), nnx.Param))
        for change in changes:
            variant = LanguageModel(change(config_from_hf(hf_json(name))), rngs=nnx.Rngs(0))
            kept = {path for path, _ in nnx.to_flat_state(nnx.state(variant, nnx.Param))}
            nnx.update(variant, nnx.from_flat_state([(path, v) for path, v in params if path in kept]))
            assert rel_err(variant(tokens), logits) > 1e-4, name
    gemma = config_from_hf(hf_json("gemma"))
    assert gemma.embedding_multiplier == math.sqrt(48) and gemma.head_dim == 16
    qwen3 = from_pretrained(FIXTURES / "qwen3")
    assert qwen3.lm_head is not None and qwen3.layers[0].self_attn.q_norm.weight.shape == (24,)


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


@pytest.mark.parametrize("name", ATTENTION)
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


@pytest.mark.parametrize("name, change, message", [
    ("qwen3", {"attention_bias": True}, "attention_bias = True is not supported"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ("qwen3", {"use_sliding_window": False, "sliding_window": None},
     "layer_types lists sliding_attention, but use_sliding_window = False"),
    ("qwen3", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types must list 2 of"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'yarn' is not supported"),
    ("gemma", {"hidden_act": "relu"}, "hidden_act = 'relu' is not supported"),
    ("gemma", {"hidden_activation": "gelu_new"}, "hidden_activation = 'gelu_new' is not supported"),
    ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention = True is not supported"),
])
def test_teacher_configs_seqmix_cannot_hold_are_refused_naming_the_key(name, change, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf_json(name) | change, "config.json")


def test_teacher_configs_in_other_forms_read_as_transformers_reads_them():
    """Qwen3's windows from max_window_layers when there are no layer_types; the default head_dim
    of each class (Qwen3 128, Gemma 256) when a config has none; Gemma's legacy hidden_act "gelu"."""
    qwen3 = {key: value for key, value in hf_json("qwen3").items() if key != "layer_types"}
    derived = config_from_hf(qwen3 | {"max_window_layers": 1})
    assert [derived.mixer(kind)[1].sliding_window for kind in derived.layer_kinds()] == [None, 5]
    assert config_from_hf(qwen3 | {"use_sliding_window": False}).layer_pattern == ["attention"]
    no_head_dim = {key: value for key, value in hf_json("qwen3").items() if key != "head_dim"}
    assert config_from_hf(no_head_dim).head_dim == 128
    gemma = hf_json("gemma")
    assert config_from_hf({k: v for k, v in gemma.items() if k != "head_dim"}).head_dim == 256
    assert config_from_hf(gemma | {"hidden_act": "gelu"}) == config_from_hf(gemma)


def test_attention_models_with_qk_norms_or_gemma_form_export_as_those_families():
    base = {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2}
    qwen3 = build(ModelConfig, base | {"layer_pattern": ["local", "global"], "mixers": {
        "local": {"type": "attention", "qk_norm": "head", "sliding_window": 8},
        "global": {"type": "attention", "qk_norm": "head"}}}, "model")
    exported = hf_config(qwen3)
    assert exported["model_type"] == "qwen3" and exported["layer_types"] == ["sliding_attention", "full_attention"]
    explicit = {"n_kv_heads": 2, "mlp_hidden": qwen3.mlp_width}  # what a config.json spells out
    mixers = {"window_8": qwen3.mixers["local"], "attention": {**qwen3.mixers["global"], "sliding_window": None}}
    assert config_from_hf(exported) == dataclasses.replace(qwen3, **explicit, layer_pattern=["window_8", "attention"],
                                                           mixers=mixers)
    gemma = build(ModelConfig, base | {"norm_unit_offset": True, "mlp_activation": "gelu_tanh",
                                       "embedding_multiplier": math.sqrt(32), "head_dim": 24}, "model")
    exported = hf_config(gemma)
    assert exported["model_type"] == "gemma" and exported["head_dim"] == 24
    assert config_from_hf(exported) == dataclasses.replace(gemma, **explicit, mixers={
        "attention": {"type": "attention", "qkv_bias": False, "output_bias": False}})


@pytest.mark.parametrize("model_type, options, message", [
    ("qwen3", {"mixers": {"a": {"type": "attention", "qk_norm": "head", "output_gate": True}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with output_gate = True has no Qwen3 equivalent"),
    ("qwen3", {"mixers": {"a": {"type": "attention", "qk_norm": "projection"}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with qk_norm = 'projection' has no Qwen3 equivalent \(it needs 'head'\)"),
    ("qwen3", {"layer_pattern": ["a", "b"],
               "mixers": {"a": {"type": "attention", "qk_norm": "head", "sliding_window": 4},
                          "b": {"type": "attention", "qk_norm": "head", "sliding_window": 8}}},
     r"model\.mixers: sliding windows of different sizes \[4, 8\] have no Qwen3 equivalent"),
    ("qwen3", {"norm_unit_offset": True, "mixers": {"a": {"type": "attention", "qk_norm": "head"}},
               "layer_pattern": ["a"]}, r"model\.norm_unit_offset: True has no Qwen3 equivalent"),
    ("gemma", {"norm_unit_offset": True, "mlp_activation": "gelu_tanh"},
     r"model\.embedding_multiplier: 1\.0 has no Gemma equivalent \(it needs sqrt\(d_model\) = 5\.65"),
    ("gemma", {"norm_unit_offset": True, "mlp_activation": "gelu_tanh", "embedding_multiplier": 32 ** 0.5,
               "mixers": {"a": {"type": "attention", "qkv_bias": True}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with qkv_bias = True and output_bias = False has no Gemma equivalent"),
    ("gemma", {"norm_unit_offset": True, "mlp_activation": "gelu_tanh", "embedding_multiplier": 32 ** 0.5,
               "logit_soft_cap": 30.0}, r"model\.logit_soft_cap: 30\.0 has no Gemma equivalent"),
    ("gemma", {"norm_unit_offset": True, "mlp_activation": "silu", "embedding_multiplier": 32 ** 0.5},
     r"model\.mlp_activation: 'silu' has no Gemma equivalent"),
    ("gemma", {"norm_unit_offset": True, "mlp_activation": "gelu_tanh", "embedding_multiplier": 32 ** 0.5,
               "mixers": {"a": {"type": "attention", "sliding_window": 4}}, "layer_pattern": ["a"]},
     r"model\.layers\.0: attention with sliding_window = 4 has no Gemma equivalent"),
])
def test_export_refuses_what_a_teacher_family_cannot_hold(model_type, options, message):
    config = build(ModelConfig, {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, **options}, "model")
    with pytest.raises(CheckpointError, match=message):
        hf_config(config, model_type)


def _cut_in_half(directory):
    tensors = directory / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])


def _config_edit(edit):
    def apply(directory):
        config = json.loads((directory / "config.json").read_text())
        edit(config)
        (directory / "config.json").write_text(json.dumps(config))
    return apply


@pytest.mark.parametrize("damage, message", [
    (_cut_in_half, r"model.safetensors: not a readable safetensors file \(Error while deserializing header"),
    (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"), "model.safetensors: not a readable"),
    (_config_edit(lambda c: c.pop("hidden_size")), "config.json: required key 'hidden_size' is missing"),
    (_config_edit(lambda c: c.update(num_hidden_layers="two")), "config.json.n_layers: expected an integer"),
    (_config_edit(lambda c: c.update(rope_parameters="linear")), "config.json: a value has the wrong type"),
])
def test_a_damaged_checkpoint_is_refused_naming_its_file(tmp_path, damage, message):
    directory = copy_fixture("qwen2", tmp_path)
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(directory)
