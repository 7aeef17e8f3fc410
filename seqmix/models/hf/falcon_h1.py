"""Falcon-H1 (`falcon_h1`): every layer a `parallel_hybrid` mixer (GQA attention with RoPE and a key
multiplier, beside a Mamba2 SSM of width mamba_d_ssm whose output norm is grouped, gate first or
norm first, or absent), then a gated MLP; muP multipliers on the embeddings, the logits, the MLP's
gate and down projections, each half's input and output, and the SSM's input projection segments.

Hub layout against seqmix: the SSM is `layers.N.mamba` and the attention `layers.N.self_attn`
(seqmix: `self_attn.mamba`, `self_attn.attention`), the MLP `feed_forward` (seqmix: `mlp`), its
norm `pre_ff_layernorm` (seqmix: `post_attention_layernorm`), the final norm `final_layernorm`
(seqmix: `norm`). The SSM's norm takes rms_norm_eps; `hidden_act` is the MLP's and the SSM
convolution's activation alike. Config defaults are transformers' (mamba_d_ssm 1024, 128 SSM heads,
...), and `time_step_limit` may hold `{"__float__": "Infinity"}`.
"""

from __future__ import annotations

from typing import Any

from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, float_json, head_dim, layer_mixers,
                                     require_options, require_plain, require_values, rope_parameters,
                                     same_options)
from seqmix.models.hf.mamba2 import chunk_size, mixer_conversions, time_step_limit
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed

OUTPUT_NORMS = {(True, True): "norm_then_gate", (True, False): "gate_then_norm"}  # (rms norm, norm first)


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu"})
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    d_model, ssm_heads = hf["hidden_size"], hf.get("mamba_n_heads", 128)
    inner = hf.get("mamba_d_ssm", 1024) or hf.get("mamba_expand", 2) * d_model
    ssm_head_dim = hf.get("mamba_d_head", "auto")
    ssm_head_dim = inner // ssm_heads if ssm_head_dim == "auto" else ssm_head_dim
    if ssm_heads * ssm_head_dim != inner:
        raise CheckpointError(f"{source}: mamba_n_heads * mamba_d_head = {ssm_heads * ssm_head_dim} must equal the "
                              f"SSM width {inner} (mamba_d_ssm, or mamba_expand * hidden_size)")
    bias = hf.get("attention_bias", False)
    rms_norm = hf.get("mamba_rms_norm", False)
    mamba2 = {"state_dim": hf.get("mamba_d_state", 256), "conv_width": hf.get("mamba_d_conv", 4),
              "num_heads": ssm_heads, "head_dim": ssm_head_dim, "n_groups": hf.get("mamba_n_groups", 1),
              "time_step_limit": time_step_limit(hf, source),
              "output_norm": OUTPUT_NORMS.get((rms_norm, hf.get("mamba_norm_before_gate", True))),
              "conv_bias": hf.get("mamba_conv_bias", True), "in_proj_bias": hf.get("mamba_proj_bias", False),
              "out_proj_bias": hf.get("projectors_bias", False),
              "in_proj_multipliers": hf.get("ssm_multipliers") or [1.0] * 5,
              "chunk_size": chunk_size(hf.get("mamba_chunk_size", 256))}
    multipliers = lambda *keys: [hf.get(key, 1.0) for key in keys]
    hybrid = {"type": "parallel_hybrid", "mamba2": mamba2,
              "attention": {"qkv_bias": bias, "output_bias": bias, "key_multiplier": hf.get("key_multiplier", 1.0)},
              "attention_multipliers": multipliers("attention_in_multiplier", "attention_out_multiplier"),
              "mamba2_multipliers": multipliers("ssm_in_multiplier", "ssm_out_multiplier")}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": d_model, "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads", 8), "head_dim": head_dim(hf),
        "mlp_hidden": hf["intermediate_size"], "mlp_bias": hf.get("mlp_bias", False),
        "mlp_multipliers": hf.get("mlp_multipliers") or [1.0, 1.0],
        "layer_pattern": ["hybrid"], "mixers": {"hybrid": hybrid},
        "rope_theta": rope.get("rope_theta", 10000.0), "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "embedding_multiplier": hf.get("embedding_multiplier", 1.0),
        "logit_multiplier": hf.get("lm_head_multiplier", 1.0),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    require_plain(config, "Falcon-H1", allowed=("mlp_bias", "mlp_multipliers", "embedding_multiplier",
                                                "logit_multiplier"))
    if not config.mlp_width:
        raise CheckpointError("model.mlp_hidden: 0 has no Falcon-H1 equivalent (every layer has an MLP)")
    layers = layer_mixers(config, {"parallel_hybrid": "attention beside mamba"})
    options = same_options(layers, "parallel_hybrid")  # every layer's, so layer 0 speaks for all
    attention, mamba2 = options.attention, options.mamba2
    require_options(0, "parallel_hybrid.attention", attention, {
        "sliding_window": None, "qk_norm": None, "output_gate": False, "rotary_fraction": 1.0,
        "output_bias": attention.qkv_bias}, "Falcon-H1")
    if mamba2.norm_eps not in (None, config.norm_eps):
        raise CheckpointError(f"model.layers.0: parallel_hybrid.mamba2 with norm_eps = {mamba2.norm_eps} has no "
                              f"Falcon-H1 equivalent (its norms share rms_norm_eps = {config.norm_eps})")
    ssm_heads, ssm_head_dim = mamba2.heads(config)
    (attention_in, attention_out), (ssm_in, ssm_out) = options.attention_multipliers, options.mamba2_multipliers
    return {
        "architectures": ["FalconH1ForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "intermediate_size": config.mlp_width,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        **NO_SPECIAL_TOKENS, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": attention.qkv_bias, "mlp_bias": config.mlp_bias,
        "mlp_multipliers": list(config.mlp_multipliers), "embedding_multiplier": config.embedding_multiplier,
        "lm_head_multiplier": config.logit_multiplier, "key_multiplier": attention.key_multiplier,
        "attention_in_multiplier": attention_in, "attention_out_multiplier": attention_out,
        "ssm_in_multiplier": ssm_in, "ssm_out_multiplier": ssm_out, "ssm_multipliers": list(mamba2.in_proj_multipliers),
        "mamba_d_ssm": ssm_heads * ssm_head_dim, "mamba_n_heads": ssm_heads, "mamba_d_head": ssm_head_dim,
        "mamba_n_groups": mamba2.n_groups, "mamba_d_state": mamba2.state_dim, "mamba_d_conv": mamba2.conv_width,
        "mamba_chunk_size": mamba2.chunk_size, "mamba_conv_bias": mamba2.conv_bias,
        "mamba_proj_bias": mamba2.in_proj_bias, "projectors_bias": mamba2.out_proj_bias,
        "mamba_rms_norm": mamba2.output_norm is not None,
        "mamba_norm_before_gate": mamba2.output_norm == "norm_then_gate",
        "time_step_limit": [float_json(bound) for bound in mamba2.time_step_limit],
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = [renamed("model.final_layernorm.weight", "model.norm.weight")]
    for index, kind in enumerate(config.layer_kinds()):
        _, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        found += [renamed(f"{layer}.pre_ff_layernorm.weight", f"{layer}.post_attention_layernorm.weight"),
                  *(renamed(f"{layer}.feed_forward.{name}_proj.{part}", f"{layer}.mlp.{name}_proj.{part}")
                    for name in ("gate", "up", "down") for part in ("weight", "bias")),
                  *(renamed(f"{layer}.self_attn.{name}_proj.{part}", f"{layer}.self_attn.attention.{name}_proj.{part}")
                    for name in "qkvo" for part in ("weight", "bias")),
                  *mixer_conversions(f"{layer}.mamba", f"{layer}.self_attn.mamba", options.mamba2, config)]
    return found


FAMILY = Family(("falcon_h1",), config_from_hf, hf_config, conversions)
