"""Qwen3-Next (`qwen3_next`) and Qwen3.5 (`qwen3_5_text`, and the language model of a `qwen3_5`
vision-language checkpoint): Gated DeltaNet layers with grouped value heads and gated attention
layers, (1 + w) RMSNorms, and in Qwen3-Next mixtures of experts with a sigmoid-gated shared expert.

Hub layout of a linear layer (`linear_attn`), against seqmix's `gated_deltanet`:
- Qwen3-Next fuses q, k, v and the output gate z into `in_proj_qkvz`, whose rows come in one
  group per key head g: [q_g (dk) | k_g (dk) | v_g (r dv) | z_g (r dv)], r = value heads per key
  head; and beta's and the decay's inputs into `in_proj_ba`, per key head [b_g (r) | a_g (r)].
  Qwen3.5 has `in_proj_qkv` ([q all | k all | v all]), `in_proj_z`, `in_proj_b`, `in_proj_a`.
- One depthwise convolution `conv1d` [C, 1, K] over the channels [q | k | v] (seqmix: three).
- `norm` is the output RMSNorm (plain w, the model's eps), `out_proj` the output projection.
Attention layers have the names seqmix uses (q_proj holds each head's [query | gate]). Sparse MLPs:
`mlp.gate` is the router, `mlp.experts.E.{gate,up,down}_proj` each expert's SwiGLU, `shared_expert`
and `shared_expert_gate` as in seqmix. Real checkpoints' `mtp.*` tensors (the multi-token
prediction head) and a vision-language checkpoint's `model.visual.*` are not read.
"""

from __future__ import annotations

from typing import Any

from seqmix.mixers.attention import AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (Family, built, default_options, head_dim, layer_mixers, read, require_moe,
                                     require_options, require_plain, require_values, rope_parameters, same_options,
                                     shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split, stacked

ARCHITECTURES = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM"}
KINDS = {"linear_attention": "linear", "full_attention": "full"}


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    layers = hf["num_hidden_layers"]
    interval = hf.get("full_attention_interval", 4)
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                      for i in range(layers)]
    unknown = sorted(set(types) - set(KINDS))
    if unknown or len(types) != layers:
        raise CheckpointError(f"{source}: layer_types must list {layers} of {', '.join(KINDS)}, got {types}")
    return types


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("model_type") == "qwen3_5":  # vision-language: the language model's config is nested
        hf = {**read(hf, source, "text_config"), "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    require_values(hf, source, {"hidden_act": "silu", "attention_bias": False})
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    key_heads, key_dim = read(hf, source, "linear_num_key_heads"), read(hf, source, "linear_key_head_dim")
    linear = {"type": "gated_deltanet", "num_heads": key_heads, "head_dim": key_dim,
              "num_v_heads": read(hf, source, "linear_num_value_heads"),
              "expand_v": read(hf, source, "linear_value_head_dim") / key_dim,
              "conv_width": hf.get("linear_conv_kernel_dim", 4)}
    full = {"type": "attention", "qk_norm": "head", "output_gate": True,
            "rotary_fraction": rope.get("partial_rotary_factor", 0.25)}
    experts = hf.get("num_experts", 0) if hf.get("model_type") == "qwen3_next" else 0
    moe = None
    if experts:
        shared = read(hf, source, "shared_expert_intermediate_size")
        moe = {"num_experts": experts, "top_k": read(hf, source, "num_experts_per_tok"),
               "expert_hidden": read(hf, source, "moe_intermediate_size"), "scoring": "softmax",
               "renormalize": hf.get("norm_topk_prob", True), "shared_hidden": shared, "shared_gate": shared > 0,
               "dense_layers": hf.get("mlp_only_layers") or [], "every": hf.get("decoder_sparse_step", 1)}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "head_dim": head_dim(hf), "mlp_hidden": hf["intermediate_size"], "moe": moe,
        "layer_pattern": shortest_period([KINDS[kind] for kind in _layer_types(hf, source)]),
        "mixers": {"linear": linear, "full": full}, "rope_theta": rope.get("rope_theta", 10000.0),
        "norm_eps": hf["rms_norm_eps"], "norm_unit_offset": True, "tie_embeddings": hf.get("tie_word_embeddings", False),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    family = "Qwen3-Next" if model_type == "qwen3_next" else "Qwen3.5"
    if not config.norm_unit_offset or config.post_norm_layers or config.rope_scaling is not None:
        raise CheckpointError(f"model: {family} has pre-norm blocks of (1 + w) RMSNorms and plain RoPE "
                              "(norm_unit_offset true, no post_norm_layers, no rope_scaling)")
    require_plain(config, family, allowed=("moe", "norm_unit_offset"))
    layers = layer_mixers(config, {"gated_deltanet": "linear_attention", "attention": "full_attention"})
    linear, full = same_options(layers, "gated_deltanet"), same_options(layers, "attention")
    for index, (name, options) in enumerate(layers):
        expected = ({"output_gate": True, "negative_eigenvalues": False, "output_norm_eps": None}
                    if name == "gated_deltanet" else
                    default_options(AttentionConfig, "rotary_fraction", qk_norm="head", output_gate=True))
        require_options(index, name, options, expected, family)
    key_heads = (linear and linear.num_heads) or config.n_heads
    key_dim = (linear and linear.head_dim) or config.dim_per_head
    hf = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "intermediate_size": config.mlp_width,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "layer_types": ["linear_attention" if name == "gated_deltanet" else "full_attention" for name, _ in layers],
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": full.rotary_fraction if full else 0.25},
        "linear_num_key_heads": key_heads, "linear_key_head_dim": key_dim,
        "linear_num_value_heads": (linear and linear.num_v_heads) or key_heads,
        "linear_value_head_dim": int(round((linear.expand_v if linear else 1.0) * key_dim)),
        "linear_conv_kernel_dim": linear.conv_width if linear else 4,
    }
    return {**hf, **_experts(config, model_type)}


def _experts(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The mixture-of-experts keys of a Qwen3-Next config (Qwen3.5's dense models have none)."""
    moe = config.moe
    if moe is None:
        return {"num_experts": 0, "mlp_only_layers": []} if model_type == "qwen3_next" else {}
    if model_type != "qwen3_next":
        raise CheckpointError("model.moe: Qwen3.5's dense models have no mixture of experts (export as qwen3_next)")
    expected = {"scoring": "softmax", "selection_bias": False, "expert_groups": 1, "routed_scale": 1.0,
                "shared_gate": True}
    require_moe(moe, expected, "Qwen3-Next")
    return {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.expert_hidden or config.mlp_width, "norm_topk_prob": moe.renormalize,
            "shared_expert_intermediate_size": moe.shared_hidden, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(config.n_layers) if not moe.sparse(i)]}


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = []
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        if spec.name == "gated_deltanet":
            found += _linear_layer(config, options, f"{layer}.linear_attn", f"{layer}.self_attn",
                                   fused=hf["model_type"] == "qwen3_next")
        if config.moe is not None and config.moe.sparse(index):
            found.append(renamed(f"{layer}.mlp.gate.weight", f"{layer}.mlp.router.weight"))
            found += [stacked(f"{layer}.mlp.experts.{{}}.{name}.weight", f"{layer}.mlp.{name}", config.moe.num_experts)
                      for name in ("gate_proj", "up_proj", "down_proj")]
    return found


def _linear_layer(config: ModelConfig, options: Any, hub: str, ours: str, *, fused: bool) -> list[Conversion]:
    key_heads, key_dim = options.num_heads or config.n_heads, options.head_dim or config.dim_per_head
    value_heads = options.num_v_heads or key_heads
    value_dim = int(round(options.expand_v * key_dim))
    ratio = value_heads // key_heads
    key_width, value_width = key_heads * key_dim, value_heads * value_dim
    projections = ["q_proj", "k_proj", "v_proj"]
    if fused:
        inputs = [split([f"{hub}.in_proj_qkvz.weight"], [f"{ours}.{name}.weight" for name in [*projections, "g_proj"]],
                        [key_dim, key_dim, ratio * value_dim, ratio * value_dim], groups=key_heads),
                  split([f"{hub}.in_proj_ba.weight"], [f"{ours}.b_proj.weight", f"{ours}.a_proj.weight"],
                        [ratio, ratio], groups=key_heads)]
    else:
        inputs = [split([f"{hub}.in_proj_qkv.weight"], [f"{ours}.{name}.weight" for name in projections],
                        [key_width, key_width, value_width]),
                  renamed(f"{hub}.in_proj_z.weight", f"{ours}.g_proj.weight"),
                  renamed(f"{hub}.in_proj_b.weight", f"{ours}.b_proj.weight"),
                  renamed(f"{hub}.in_proj_a.weight", f"{ours}.a_proj.weight")]
    return [*inputs,
            split([f"{hub}.conv1d.weight"], [f"{ours}.{name}.weight" for name in ("q_conv", "k_conv", "v_conv")],
                  [key_width, key_width, value_width], conv=True),
            renamed(f"{hub}.A_log", f"{ours}.A_log"), renamed(f"{hub}.dt_bias", f"{ours}.dt_bias"),
            renamed(f"{hub}.norm.weight", f"{ours}.o_norm.weight"),
            renamed(f"{hub}.out_proj.weight", f"{ours}.o_proj.weight")]


TEXT = Family(tuple(ARCHITECTURES), config_from_hf, hf_config, conversions, ignored=("mtp.",))
VISION_LANGUAGE = Family(("qwen3_5",), config_from_hf, None, conversions, ignored=("mtp.", "model.visual."),
                         prefix="model.language_model.")
