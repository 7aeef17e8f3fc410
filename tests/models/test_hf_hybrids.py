"""The 2026 hybrid families from Hugging Face against fixtures that transformers 5.24 made
(tests/fixtures/hf/make_fixtures.py): Qwen3-Next (grouped value heads, partial RoPE, gated
attention, experts with a gated shared expert and a dense layer among sparse ones), Qwen3.5 (and
its vision-language checkpoint, whose vision tower and multi-token prediction tensors are
skipped), OLMo-hybrid (post-norm attention without positions, q/k norms over the projection,
negative eigenvalues), Kimi Linear (KDA, MLA with and without a query LoRA, sigmoid routing with
a selection bias, expert groups, a routed scale, shared experts) and Nemotron-H (grouped Mamba-2 with
a dt floor, attention without positions, squared-ReLU MLP and latent expert layers), Mamba-2
(grouped B/C, a clamped dt, biases, chunks that split the input; its forward does not depend on
the chunk size) and Falcon-H1 (attention beside Mamba-2 in every layer, muP multipliers, an SSM
width of its own, each form of the SSM's output norm), LFM2 (gated short convolutions with biases,
its MLP width rule, tied embeddings) and MiniMax (lightning attention at several depths, a window
shorter than the input, residuals after the norms with non-unit alphas and betas, softmax experts;
decay tables checked against the config). Logits,
transformers' own greedy continuation through seqmix's decode caches, export in the hub layout,
config aliases, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import FIXTURES, copy_fixture, hf_json, logits_of, rel_err
from safetensors.numpy import load_file, save_file

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.generate import generate
from seqmix.models.hf import CheckpointError, config_from_hf, from_pretrained, hf_config, save_pretrained
from seqmix.models.hf import minimax
from seqmix.models.lm import LanguageModel

HYBRIDS = ["qwen3_next", "qwen3_5_text", "qwen3_5", "olmo_hybrid", "kimi_linear", "kimi_linear_no_q_lora",
           "nemotron_h", "lfm2", "minimax", "mamba2", "falcon_h1", "falcon_h1_no_norm",
           "recurrent_gemma"]
# What each exports as (the vision-language checkpoint's language model as a Qwen3.5 text model).
EXPORTED_AS = {"qwen3_5": "qwen3_5_text", "kimi_linear_no_q_lora": "kimi_linear",
               "falcon_h1_no_norm": "falcon_h1"}



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
        "nemotron_h": [lambda c: _mixer(c, "mamba", n_groups=1, state_dim=24),  # the same shapes, one group
                       lambda c: _mixer(c, "mamba", time_step_limit=[0.0, float("inf")])],  # no time_step_min
        "minimax": [lambda c: dataclasses.replace(c, residual_scales={kind: [1.0] * 4 for kind in c.residual_scales}),
                    lambda c: _mixer(c, "full", sliding_window=None)],
        "mamba2": [lambda c: _mixer(c, "mamba2", n_groups=1, state_dim=32),  # the same shapes, one group
                   lambda c: _mixer(c, "mamba2", time_step_limit=[0.0, float("inf")])],
        "falcon_h1": [lambda c: _hybrid(c, attention={"key_multiplier": 1.0}),
                      lambda c: _hybrid(c, mamba2={"in_proj_multipliers": [1.0] * 5}),
                      lambda c: _hybrid(c, mamba2={"output_norm": "gate_then_norm"}),
                      lambda c: _hybrid(c, attention_multipliers=[1.0, 1.0], mamba2_multipliers=[1.0, 1.0]),
                      lambda c: dataclasses.replace(c, mlp_multipliers=[1.0, 1.0])],
        "recurrent_gemma": [lambda c: dataclasses.replace(c, logit_soft_cap=None),
                            lambda c: _mixer(c, "attention", sliding_window=None),
                            lambda c: _mixer(c, "attention", rotary_fraction=1.0)],
    }
    for name, variants in changes.items():
        files = expected(name)
        tokens = jnp.asarray(files["input_ids"], jnp.int32)
        loaded = nnx.state(from_pretrained(FIXTURES / name))
        for change in variants:
            # built abstractly and given the loaded weights, as from_pretrained builds a model
            config = change(config_from_hf(hf_json(name)))
            variant = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))), loaded)
            assert rel_err(logits_of(variant, tokens), files["logits"]) > 1e-3, name


def test_a_mamba2_forward_does_not_depend_on_its_chunk_size():
    """The mamba2 fixture's model (its config's chunks of 6 tokens read as seqmix's 16) on 40-token
    rows in three chunks of 16 tokens and in one of 64: the same logits."""
    config = config_from_hf(hf_json("mamba2"))
    assert config.mixers["mamba2"]["chunk_size"] == 16
    params = nnx.state(from_pretrained(FIXTURES / "mamba2"), nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, config.vocab_size)
    logits = []
    for size in (16, 64):
        model = LanguageModel(_mixer(config, "mamba2", chunk_size=size), rngs=nnx.Rngs(0))
        nnx.update(model, params)
        assert model.layers[0].self_attn.chunk_size == size  # what the mixer hands its chunked op
        logits.append(logits_of(model, tokens))
    assert rel_err(logits[0], logits[1]) < 1e-5


def _mixer(config, kind, **options):
    return dataclasses.replace(config, mixers={**config.mixers, kind: {**config.mixers[kind], **options}})


def _hybrid(config, **options):
    """Falcon-H1's parallel_hybrid layers with `options` changed (those of its halves merged in)."""
    hybrid = config.mixers["hybrid"]
    return _mixer(config, "hybrid", **{key: {**hybrid[key], **value} if isinstance(value, dict) else value
                                       for key, value in options.items()})


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
    original = {key: value for key, value in original.items() if not key.startswith("mtp.")}  # prediction heads
    if name == "qwen3_5":  # the language model alone, under the text model's names
        original = {key.replace("model.language_model.", "model."): value for key, value in original.items()
                    if not key.startswith("model.visual.")}
    assert set(written) == set(original)
    for key in original:
        if "_conv1d" in key:  # transformers cuts OLMo's and Kimi's convolution in equal thirds: compare the whole
            stem = key.rsplit(".", 2)[0] + "."
            whole = lambda tensors: np.concatenate([tensors[f"{stem}{n}_conv1d.weight"] for n in "qkv"])
            np.testing.assert_array_equal(whole(written), whole(original), err_msg=key)
        elif key.endswith(minimax.TABLES):  # recomputed from the config: equal to float32 rounding
            np.testing.assert_allclose(written[key], original[key], rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(written[key], original[key], err_msg=key)
    files = expected(name)
    assert rel_err(logits_of(from_pretrained(tmp_path), jnp.asarray(files["input_ids"], jnp.int32)),
                   files["logits"]) < 1e-5


def test_configs_in_the_hub_forms_read_as_the_same_model():
    """Kimi's hub config.json (linear_attn_config with 1-indexed layers, first_k_dense_replace and
    transformers' own key names), Qwen3-Next's older one (full_attention_interval, a top-level
    partial_rotary_factor), LFM2's older names (block_ff_dim, tie_embedding, full_attn_idxs) and
    MiniMax's (num_experts, rotary_dim) and RecurrentGemma's (the RoPE keys at the top level,
    sliding_window for attention_window_size) give the models their transformers forms give."""
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
    nemotron = hf_json("nemotron_h")  # NVIDIA's own config.json: the pattern string and the mamba_ names
    renames = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
               "time_step_min": "mamba_dt_min", "use_conv_bias": "mamba_conv_bias",
               "n_routed_experts": "num_local_experts"}
    hub = {renames.get(key, key): value for key, value in nemotron.items() if key != "layers_block_type"}
    assert config_from_hf(hub | {"hybrid_override_pattern": "M*-E", "num_hidden_layers": 4}) == config_from_hf(nemotron)
    lfm2 = hf_json("lfm2")  # LFM2's older names, and its attention layers as indices
    hub = {key: value for key, value in lfm2.items() if key not in ("layer_types", "intermediate_size",
                                                                   "tie_word_embeddings")}
    assert config_from_hf(hub | {"block_ff_dim": 112, "tie_embedding": True}) == config_from_hf(lfm2)
    assert config_from_hf(lfm2).mlp_hidden == 128  # int(1.5 * int(2 * 112 / 3)) = 111, up to a multiple of 32
    minimax = hf_json("minimax")  # MiniMax-Text-01's rotary_dim (which transformers ignores), num_experts
    hub = {key: value for key, value in minimax.items() if key != "num_local_experts"} | {"num_experts": 4}
    assert config_from_hf(hub) == config_from_hf(minimax)
    assert config_from_hf(minimax | {"rotary_dim": 6}).mixers["full"]["rotary_fraction"] == 0.5
    mamba2 = hf_json("mamba2")  # an infinity in transformers' JSON form, and as json reads a bare Infinity
    unbounded = config_from_hf(mamba2 | {"time_step_limit": [0.01, {"__float__": "Infinity"}]})
    assert unbounded == config_from_hf(mamba2 | {"time_step_limit": [0.01, float("inf")]})
    assert hf_config(unbounded, "mamba2")["time_step_limit"] == [0.01, {"__float__": "Infinity"}]
    falcon = hf_json("falcon_h1")  # the SSM head width left to transformers
    assert config_from_hf(falcon | {"mamba_d_head": "auto"}) == config_from_hf(falcon)
    # the gate before the norm: the Mamba-2 form, whose parity the mamba2 and nemotron_h fixtures hold
    gate_first = config_from_hf(falcon | {"mamba_norm_before_gate": False})
    assert gate_first.mixers["hybrid"]["mamba2"]["output_norm"] == "gate_then_norm"
    assert hf_config(gate_first, "falcon_h1")["mamba_norm_before_gate"] is False
    gemma = hf_json("recurrent_gemma")  # recurrentgemma-2b's config.json: the RoPE keys at the top level;
    hub = {key: value for key, value in gemma.items() if key not in ("rope_parameters", "attention_window_size")}
    hub |= {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "sliding_window": 6}  # and transformers' alias
    assert config_from_hf(hub) == config_from_hf(gemma)
    two_b = config_from_hf(gemma | {"hidden_size": 2560, "num_attention_heads": 10, "num_hidden_layers": 26})
    assert two_b.layer_kinds() == (["recurrent", "recurrent", "attention"] * 9)[:26]  # the pattern cut short
    # sqrt(hidden_size) in bfloat16, as transformers multiplies: the fixture's parity holds at 1e-6 with
    # its 6.9375, and misses by 8e-4 with sqrt(48) = 6.928
    assert (two_b.embedding_multiplier, config_from_hf(gemma).embedding_multiplier) == (50.5, 6.9375)



def test_minimax_decay_tables_that_disagree_with_the_config_are_refused(tmp_path):
    """MiniMax checkpoints carry each lightning layer's decays; seqmix computes them from the
    config, and a checkpoint whose tables say otherwise is not the model its config describes."""
    directory = copy_fixture("minimax", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.3.self_attn.slope_rate"] = tensors["model.layers.1.self_attn.slope_rate"]  # another depth
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.3\.self_attn\.slope_rate disagrees with the "
                                              r"decays of layer 3 of 4 with 4 heads, blocks of 8"):
        from_pretrained(directory)


def test_mamba2_checkpoints_with_the_older_embedding_name_load(tmp_path):
    """`backbone.embedding.weight` (older Mamba-2 checkpoints) is read as `backbone.embeddings.weight`."""
    directory = copy_fixture("mamba2", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    np.testing.assert_array_equal(from_pretrained(directory).embed_tokens.embedding[...],
                                  tensors["backbone.embedding.weight"])


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
    ("lfm2", {"layer_types": ["conv", "sliding_attention", "conv", "conv"]}, "layer_types must list 4 of conv"),
    ("minimax", {"rotary_dim": 6, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.25}},
     r"rotary_dim = 6 of head_dim 12 disagrees with partial_rotary_factor = 0\.25"),
    ("minimax", {"num_local_experts": None}, "key num_local_experts is missing"),
    ("nemotron_h", {"mlp_hidden_act": "silu"}, "mlp_hidden_act = 'silu' is not supported"),
    ("nemotron_h", {"layers_block_type": None, "hybrid_override_pattern": "M*X-"},
     r"hybrid_override_pattern 'M\*X-' holds X \(its layers are M \(linear_attention\)"),
    ("mamba2", {"num_heads": 6}, r"expand \* hidden_size = 128 must equal num_heads \* head_dim = 96"),
    ("mamba2", {"time_step_limit": [0.0, "inf"]}, "time_step_limit holds 'inf', not a number"),
    ("falcon_h1", {"mamba_d_head": 12}, r"mamba_n_heads \* mamba_d_head = 72 must equal the SSM width 96"),
    ("recurrent_gemma", {"hidden_activation": "gelu"}, "hidden_activation = 'gelu' is not supported"),
    ("recurrent_gemma", {"block_types": ["recurrent", "mlp"]}, "block_types must list recurrent or attention"),
])
def test_unsupported_configs_name_the_key(name, change, message):
    hf = {key: value for key, value in (hf_json(name) | change).items() if value is not None}
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf, "config.json")


@pytest.mark.parametrize("model_type, options, message", [
    ("qwen3_next", {"moe": {"num_experts": 4, "scoring": "sigmoid", "shared_hidden": 8, "shared_gate": True}},
     r"model\.moe\.scoring: 'sigmoid' has no Qwen3-Next equivalent"),
    ("qwen3_next", {"moe": {"num_experts": 4, "shared_hidden": 8, "shared_gate": True, "activation": "relu2"}},
     r"model\.moe\.activation: 'relu2' has no Qwen3-Next equivalent"),
    ("qwen3_5_text", {"moe": {"num_experts": 4}}, r"model\.moe: Qwen3\.5's dense models have no mixture"),
    ("olmo_hybrid", {"post_norm_layers": []}, r"model\.layers\.1: OLMo-hybrid's attention layers are post-norm"),
    ("kimi_linear", {"norm_unit_offset": False, "tie_embeddings": False, "layer_pattern": ["kda", "attention"]},
     r"model\.layers\.1: a 'attention' layer has no place"),
    ("lfm2", {"norm_unit_offset": False, "moe": None, "layer_pattern": ["conv", "attention"],
              "mixers": {"conv": {"type": "gated_conv", "input_gate": True},
                         "attention": {"type": "attention", "qk_norm": "head", "output_gate": True}}},
     r"model\.layers\.1: attention with output_gate = True has no LFM2 equivalent"),
    ("lfm2", {"norm_unit_offset": False, "moe": None, "logit_soft_cap": 30.0, "layer_pattern": ["gated_conv"],
              "mixers": {}},
     r"model\.logit_soft_cap: 30\.0 has no LFM2 equivalent"),
    ("minimax", {"norm_unit_offset": False, "moe": {"num_experts": 4}, "layer_pattern": ["lightning", "attention"],
                 "mixers": {}}, r"model\.residual_scales: MiniMax takes every layer's residuals after its norms"),
    ("nemotron_h", {"norm_unit_offset": False, "tie_embeddings": False, "moe": None, "mlp_hidden": 0,
                    "layer_pattern": ["mamba2", "attention"], "mixers": {}},
     r"model\.layers\.1: attention with rotary_fraction = 1\.0 has no Nemotron-H equivalent \(it needs 0\.0\)"),
    ("mamba2", {"norm_unit_offset": False, "moe": None, "layer_pattern": ["mamba2"], "mixers": {}},
     r"model\.mlp_hidden: 128 has no Mamba-2 equivalent"),
    ("falcon_h1", {"norm_unit_offset": False, "moe": None, "layer_pattern": ["hybrid"], "mixers": {"hybrid": {
        "type": "parallel_hybrid", "attention": {"sliding_window": 4}}}},
     r"model\.layers\.0: parallel_hybrid\.attention with sliding_window = 4 has no Falcon-H1 equivalent"),
    ("recurrent_gemma", {"moe": None, "layer_pattern": ["rg_lru", "attention"], "mixers": {},
                         "mlp_activation": "gelu_tanh", "mlp_bias": True, "logit_soft_cap": 30.0},
     r"model\.embedding_multiplier: 1\.0 has no RecurrentGemma equivalent \(it needs 5\.65625\)"),
    ("recurrent_gemma", {"moe": None, "layer_pattern": ["rg_lru", "attention"], "embedding_multiplier": 5.65625,
                         "mixers": {"attention": {"type": "attention", "output_bias": True}},
                         "mlp_activation": "gelu_tanh", "mlp_bias": True, "logit_soft_cap": 30.0},
     r"model\.layers\.1: RecurrentGemma's attention is local"),
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
