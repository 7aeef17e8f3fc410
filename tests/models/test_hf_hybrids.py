"""The 2026 hybrid families from Hugging Face against fixtures that transformers 5.24 made
(tests/fixtures/hf/make_fixtures.py): Qwen3-Next (grouped value heads, partial RoPE, gated
attention, experts with a gated shared expert and a dense layer among sparse ones), Qwen3.5 (and
its vision-language checkpoint, whose vision tower and multi-token prediction tensors are
skipped), OLMo-hybrid (post-norm attention without positions, q/k norms over the projection,
negative eigenvalues) and Kimi Linear (KDA, MLA with and without a query LoRA, sigmoid routing with
a selection bias, expert groups, a routed scale, shared experts). Logits, transformers' own greedy
continuation through seqmix's decode caches, export in the hub layout, config aliases, errors."""

import dataclasses
import json

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

HYBRIDS = ["qwen3_next", "qwen3_5_text", "qwen3_5", "olmo_hybrid", "kimi_linear", "kimi_linear_no_q_lora"]
# What each exports as (the vision-language checkpoint's language model as a Qwen3.5 text model).
EXPORTED_AS = {"qwen3_5": "qwen3_5_text", "kimi_linear_no_q_lora": "kimi_linear"}



@nnx.jit
def logits_of(model, tokens):
    """The full forward's logits (jitted: several times faster than eager here, and models of one
    structure share the compilation)."""
    return model(tokens)


def expected(name):
    return load_file(FIXTURES / name / "expected.safetensors")



@pytest.fixture(scope="module")
def loaded():
    """Each fixture's model, loaded once."""
    return {name: from_pretrained(FIXTURES / name) for name in HYBRIDS}


@pytest.mark.parametrize("name", HYBRIDS)
def test_logits_and_greedy_continuation_match_transformers(name, loaded):
    model, files = loaded[name], expected(name)
    tokens = jnp.asarray(files["input_ids"], jnp.int32)
    assert rel_err(logits_of(model, tokens), files["logits"]) < 1e-5
    if name != "qwen3_5":  # its language model decodes as qwen3_5_text's does
        # transformers' own cached `generate`, greedy: prefill then one-token steps through the caches
        continued = generate(model, tokens, files["greedy"].shape[1], rng=jax.random.key(0), temperature=0.0)
        np.testing.assert_array_equal(np.asarray(continued), files["greedy"])


def test_the_fixtures_exercise_the_options_that_make_each_family():
    """Loading without one of these options would not pass the parity test."""
    changes = {
        "qwen3_next": [lambda c: _mixer(c, "full", rotary_fraction=1.0)],
        "olmo_hybrid": [lambda c: _mixer(c, "linear", output_norm_eps=None),
                        lambda c: _mixer(c, "linear", negative_eigenvalues=False)],
        "kimi_linear": [lambda c: dataclasses.replace(c, moe=dataclasses.replace(c.moe, expert_groups=1,
                                                                                 groups_per_token=1))],
    }
    for name, variants in changes.items():
        files = expected(name)
        tokens = jnp.asarray(files["input_ids"], jnp.int32)
        params = nnx.state(from_pretrained(FIXTURES / name), nnx.Param)
        for change in variants:
            variant = LanguageModel(change(config_from_hf(hf_json(name))), rngs=nnx.Rngs(0))
            nnx.update(variant, params)
            assert rel_err(logits_of(variant, tokens), files["logits"]) > 1e-3, name


def _mixer(config, kind, **options):
    return dataclasses.replace(config, mixers={**config.mixers, kind: {**config.mixers[kind], **options}})


@pytest.mark.parametrize("name", HYBRIDS)
def test_export_writes_the_hub_layout_that_was_read(tmp_path, name, loaded):
    """save_pretrained writes back the checkpoint's own tensors under its own names (per-expert
    tensors, fused projections and convolutions, renamed norms), a config.json that reads back
    as the same model, and what it wrote loads with the same logits."""
    config = config_from_hf(hf_json(name))
    save_pretrained(loaded[name], config, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == EXPORTED_AS.get(name, name)
    assert config_from_hf(exported) == config
    original, written = load_file(FIXTURES / name / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    if name == "qwen3_5":  # the language model alone, under the text model's names
        original = {key.replace("model.language_model.", "model."): value for key, value in original.items()
                    if not key.startswith(("model.visual.", "mtp."))}
    assert set(written) == set(original)
    for key in original:
        if "_conv1d" in key:  # transformers cuts OLMo's and Kimi's convolution in equal thirds: compare the whole
            stem = key.rsplit(".", 2)[0] + "."
            whole = lambda tensors: np.concatenate([tensors[f"{stem}{n}_conv1d.weight"] for n in "qkv"])
            np.testing.assert_array_equal(whole(written), whole(original), err_msg=key)
        else:
            np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    files = expected(name)
    assert rel_err(logits_of(from_pretrained(tmp_path), jnp.asarray(files["input_ids"], jnp.int32)),
                   files["logits"]) < 1e-5


def test_configs_in_the_hub_forms_read_as_the_same_model():
    """Kimi's hub config.json (linear_attn_config with 1-indexed layers, first_k_dense_replace and
    transformers' own key names) and Qwen3-Next's older one (full_attention_interval, a top-level
    partial_rotary_factor) give the models their transformers forms give."""
    kimi = hf_json("kimi_linear_no_q_lora")
    hub = {key: value for key, value in kimi.items() if key not in (
        "layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim",
        "num_experts", "num_experts_per_token", "num_shared_experts", "num_expert_group", "moe_renormalize")}
    hub |= {"linear_attn_config": {"full_attn_layers": [4], "kda_layers": [1, 2, 3], "num_heads": 4, "head_dim": 8,
                                   "short_conv_kernel_size": 3},
            "first_k_dense_replace": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
            "n_group": 1, "norm_topk_prob": False}
    assert config_from_hf(hub) == config_from_hf(kimi)
    qwen = hf_json("qwen3_next")
    older = {key: value for key, value in qwen.items() if key not in ("layer_types", "rope_parameters")}
    older |= {"full_attention_interval": 4, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert config_from_hf(older) == config_from_hf(qwen)



def test_missing_misshapen_and_unexpected_tensors_are_named(tmp_path):
    directory = copy_fixture("kimi_linear", tmp_path)
    tensors = load_file(directory / "model.safetensors")

    def rewrite(**replace):
        kept = {k: v for k, v in tensors.items() if replace.get(k, v) is not None}
        save_file({**kept, **{k: v for k, v in replace.items() if v is not None}}, directory / "model.safetensors",
                  metadata={"format": "pt"})

    rewrite(**{"model.layers.3.block_sparse_moe.experts.5.w2.weight": None})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.3\.block_sparse_moe\.experts\.5\.w2\.weight "
                                              r"is missing \(the model needs it for model\.layers\.3\.mlp\.down_proj\)"):
        from_pretrained(directory)
    rewrite(**{"model.layers.0.self_attn.v_conv1d.weight": np.zeros((16, 1, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"v_conv1d\.weight has 80 rows, expected 96"):
        from_pretrained(directory)
    rewrite(**{"model.layers.3.block_sparse_moe.gate.weight": np.zeros((8, 65), np.float32)})
    with pytest.raises(CheckpointError, match=r"gate\.weight gives model\.layers\.3\.mlp\.router\.weight of shape "
                                              r"\(8, 65\), expected \(8, 64\)"):
        from_pretrained(directory)
    rewrite(**{"model.layers.0.self_attn.rotary_emb.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"rotary_emb\.weight has no place in the model"):
        from_pretrained(directory)

    qwen = copy_fixture("qwen3_next", tmp_path)
    tensors = load_file(qwen / "model.safetensors")
    tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"] = tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"][:-2]
    save_file(tensors, qwen / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"in_proj_qkvz\.weight has 126 rows, expected 128"):
        from_pretrained(qwen)


@pytest.mark.parametrize("name, change, message", [
    ("kimi_linear", {"num_key_value_heads": 2}, "num_key_value_heads = 2 must equal num_attention_heads = 4"),
    ("kimi_linear", {"moe_router_activation_func": "softmax"}, "moe_router_activation_func = 'softmax' is not"),
    ("kimi_linear", {"layer_types": None, "linear_attn_config": {"full_attn_layers": [0], "kda_layers": [1, 2, 3]}},
     r"full_attn_layers lists layer 0, outside 1\.\.4"),
    ("qwen3_next", {"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "layer_types must list 4"),
    ("qwen3_next", {"linear_num_key_heads": None}, "key linear_num_key_heads is missing"),
    ("qwen3_5", {"text_config": None}, "key text_config is missing"),
    ("olmo_hybrid", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
])
def test_unsupported_configs_name_the_key(name, change, message):
    hf = {key: value for key, value in (hf_json(name) | change).items() if value is not None}
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf, "config.json")


@pytest.mark.parametrize("model_type, options, message", [
    ("qwen3_next", {"moe": {"num_experts": 4, "scoring": "sigmoid", "shared_hidden": 8, "shared_gate": True}},
     r"model\.moe\.scoring: 'sigmoid' has no Qwen3-Next equivalent"),
    ("qwen3_5_text", {"moe": {"num_experts": 4}}, r"model\.moe: Qwen3\.5's dense models have no mixture"),
    ("olmo_hybrid", {"post_norm_layers": []}, r"model\.layers\.1: OLMo-hybrid's attention layers are post-norm"),
    ("kimi_linear", {"norm_unit_offset": False, "tie_embeddings": False, "layer_pattern": ["kda", "attention"]},
     r"model\.layers\.1: a 'attention' layer has no place"),
])
def test_export_refuses_what_a_family_cannot_hold(model_type, options, message):
    base = {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "norm_unit_offset": True,
            "layer_pattern": ["gated_deltanet", "attention"],
            "mixers": {"attention": {"type": "attention", "qk_norm": "head", "output_gate": True}},
            "moe": {"num_experts": 4, "scoring": "sigmoid", "selection_bias": True}}
    if model_type == "olmo_hybrid":
        base |= {"norm_unit_offset": False, "moe": None,
                 "mixers": {"attention": {"type": "attention", "qk_norm": "projection"},
                            "gated_deltanet": {"type": "gated_deltanet", "output_norm_eps": 1e-5}}}
    config = build(ModelConfig, {key: value for key, value in (base | options).items() if value is not None}, "model")
    with pytest.raises(CheckpointError, match=message):
        hf_config(config, model_type)


def test_a_model_that_no_format_holds_says_why_for_each():
    config = build(ModelConfig, {"d_model": 32, "n_heads": 2, "n_layers": 2, "layer_pattern": ["gla"]}, "model")
    with pytest.raises(CheckpointError, match=r"(?s)no Hugging Face format.*llama/mistral/qwen2: model\.layers\.0: "
                                              r"a 'gla' layer.*kimi_linear: model: Kimi Linear has"):
        hf_config(config)
