"""Kimi Linear (`kimi_linear`): Kimi Delta Attention layers and multi-head latent attention layers
without positions, plain RMSNorms, and mixtures of experts with sigmoid routing, a selection bias,
expert groups, a routed scale and ungated shared experts.

Config keys come under transformers' names or the hub's (`attribute_map`: num_experts,
num_experts_per_token, num_shared_experts, num_expert_group, moe_renormalize); layer kinds from
`layer_types`, else the hub's `linear_attn_config` (`full_attn_layers`, `kda_layers`, 1-indexed,
with the KDA `num_heads`, `head_dim` and `short_conv_kernel_size`), else transformers' default;
MLP kinds from `mlp_layer_types`, else `first_k_dense_replace` (default 1).

Hub layout against seqmix: every MLP is `block_sparse_moe` (seqmix: `mlp`), whose experts are
`experts.E.w1` (gate), `w3` (up), `w2` (down), router `gate.weight` and selection bias
`gate.e_score_correction_bias`, shared experts `shared_experts` (seqmix: `shared_expert`); KDA's
A_log is stored [1, 1, H, 1] and its convolutions [C, 1, K] (read as one, as OLMo-hybrid's: see
`olmo_hybrid`). MLA's tensors have seqmix's names.
"""

from __future__ import annotations

from typing import Any

from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, layer_mixers, read, require_moe,
                                     require_options, require_plain, require_values, same_options, shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split, stacked

KINDS = {"linear_attention": "kda", "full_attention": "mla"}


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    layers = hf["num_hidden_layers"]
    hub = hf.get("linear_attn_config") or {}
    types = hf.get("layer_types")
    if types is None and "full_attn_layers" in hub and "kda_layers" in hub:
        types = [None] * layers
        for key, kind in (("full_attn_layers", "full_attention"), ("kda_layers", "linear_attention")):
            for number in hub[key]:
                if not 1 <= number <= layers:
                    raise CheckpointError(f"{source}: linear_attn_config.{key} lists layer {number}, outside "
                                          f"1..{layers} (they count from 1)")
                types[number - 1] = kind
    elif types is None:  # transformers' default
        types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(layers)]
    if set(types) - set(KINDS) or len(types) != layers:
        raise CheckpointError(f"{source}: the layer kinds must be {layers} of {', '.join(KINDS)}, got {types}")
    return types


def _dense_layers(hf: dict[str, Any], source: str) -> list[int]:
    types = hf.get("mlp_layer_types")
    if types is None:
        return list(range(min(hf.get("first_k_dense_replace", 1), hf["num_hidden_layers"])))
    if set(types) - {"dense", "sparse"} or len(types) != hf["num_hidden_layers"]:
        raise CheckpointError(f"{source}: mlp_layer_types must list {hf['num_hidden_layers']} of dense, sparse, "
                              f"got {types}")
    return [index for index, kind in enumerate(types) if kind == "dense"]


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu", "attention_bias": False,
                                "moe_router_activation_func": "sigmoid"})
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) not in (None, heads):
        raise CheckpointError(f"{source}: num_key_value_heads = {hf['num_key_value_heads']} must equal "
                              f"num_attention_heads = {heads} (MLA has no grouped keys)")
    hub = hf.get("linear_attn_config") or {}
    kda = {"type": "kda", "num_heads": hub.get("num_heads", hf.get("linear_num_heads", 32)),
           "head_dim": hub.get("head_dim", hf.get("linear_head_dim", 128)),
           "conv_width": hub.get("short_conv_kernel_size", hf.get("linear_conv_kernel_dim", 4))}
    mla = {"type": "mla", "kv_lora_rank": read(hf, source, "kv_lora_rank"), "q_lora_rank": hf.get("q_lora_rank"),
           "qk_nope_head_dim": read(hf, source, "qk_nope_head_dim"),
           "qk_rope_head_dim": read(hf, source, "qk_rope_head_dim"), "v_head_dim": read(hf, source, "v_head_dim"),
           "rope": False}
    expert_hidden = read(hf, source, "moe_intermediate_size")
    moe = {"num_experts": read(hf, source, "num_local_experts", "num_experts"),
           "top_k": read(hf, source, "num_experts_per_tok", "num_experts_per_token"),
           "expert_hidden": expert_hidden, "scoring": "sigmoid",
           "renormalize": read(hf, source, "norm_topk_prob", "moe_renormalize", default=True), "selection_bias": True,
           "expert_groups": read(hf, source, "n_group", "num_expert_group", default=1),
           "groups_per_token": hf.get("topk_group") or 1,
           "routed_scale": hf.get("routed_scaling_factor", 1.0),
           "shared_hidden": expert_hidden * read(hf, source, "n_shared_experts", "num_shared_experts", default=1),
           "dense_layers": _dense_layers(hf, source)}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "mlp_hidden": hf["intermediate_size"], "moe": moe,
        "layer_pattern": shortest_period([KINDS[kind] for kind in _layer_types(hf, source)]),
        "mixers": {"kda": kda, "mla": mla}, "norm_eps": hf["rms_norm_eps"],
        "tie_embeddings": False,  # transformers' Kimi Linear has a head of its own, whatever tie_word_embeddings says
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    moe = config.moe
    if moe is None or config.norm_unit_offset or config.post_norm_layers or config.tie_embeddings:
        raise CheckpointError("model: Kimi Linear has mixtures of experts, pre-norm blocks of plain RMSNorms and a "
                              "head of its own (moe set, norm_unit_offset false, no post_norm_layers, "
                              "tie_embeddings false)")
    require_plain(config, "Kimi Linear", allowed=("moe",))
    expected = {"scoring": "sigmoid", "selection_bias": True, "shared_gate": False}
    require_moe(moe, expected, "Kimi Linear")
    expert_hidden = moe.expert_hidden or config.mlp_width
    if moe.shared_hidden % expert_hidden:
        raise CheckpointError(f"model.moe.shared_hidden: {moe.shared_hidden} is not a whole number of experts "
                              f"of width {expert_hidden} (Kimi Linear's shared experts)")
    layers = layer_mixers(config, {"kda": "linear_attention", "mla": "full_attention"})
    kda, mla = same_options(layers, "kda"), same_options(layers, "mla")
    for index, (name, options) in enumerate(layers):
        expected = ({"num_v_heads": None, "negative_eigenvalues": False, "gate_lower_bound": None} if name == "kda"
                    else {"rope": False})
        require_options(index, name, options, expected, "Kimi Linear")
    attention = {}
    if mla is not None:
        attention = {"kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank,
                     "qk_nope_head_dim": mla.qk_nope_head_dim or config.dim_per_head,
                     "qk_rope_head_dim": mla.qk_rope_head_dim, "v_head_dim": mla.v_head_dim or config.dim_per_head}
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "intermediate_size": config.mlp_width,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_heads, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        **NO_SPECIAL_TOKENS,
        "layer_types": ["linear_attention" if name == "kda" else "full_attention" for name, _ in layers],
        "mlp_layer_types": ["sparse" if moe.sparse(i) else "dense" for i in range(config.n_layers)],
        "linear_num_heads": (kda and kda.num_heads) or config.n_heads,
        "linear_head_dim": (kda and kda.head_dim) or config.dim_per_head,
        "linear_conv_kernel_dim": kda.conv_width if kda else 4, **attention,
        "num_experts": moe.num_experts, "num_experts_per_token": moe.top_k, "moe_intermediate_size": expert_hidden,
        "moe_renormalize": moe.renormalize, "num_expert_group": moe.expert_groups, "topk_group": moe.groups_per_token,
        "routed_scaling_factor": moe.routed_scale, "num_shared_experts": moe.shared_hidden // expert_hidden,
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = []
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        if spec.name == "kda":
            heads, head_dim = options.num_heads or config.n_heads, options.head_dim or config.dim_per_head
            hub = f"{layer}.self_attn"
            found += [renamed(f"{hub}.A_log", f"{hub}.A_log", hub_shape=(1, 1, heads, 1)),
                      split([f"{hub}.{name}_conv1d.weight" for name in "qkv"],
                            [f"{hub}.{name}_conv1d.weight" for name in "qkv"], [heads * head_dim] * 3,
                            hub_sizes=[heads * head_dim] * 3, conv=True)]
        hub, ours = f"{layer}.block_sparse_moe", f"{layer}.mlp"
        if config.moe is None or not config.moe.sparse(index):
            found += [renamed(f"{hub}.{name}.weight", f"{ours}.{name}.weight")
                      for name in ("gate_proj", "up_proj", "down_proj")]
            continue
        found += [renamed(f"{hub}.gate.weight", f"{ours}.router.weight"),
                  renamed(f"{hub}.gate.e_score_correction_bias", f"{ours}.selection_bias"),
                  *(stacked(f"{hub}.experts.{{}}.{hub_name}.weight", f"{ours}.{name}", config.moe.num_experts)
                    for hub_name, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")))]
        if config.moe.shared_hidden:
            found += [renamed(f"{hub}.shared_experts.{name}.weight", f"{ours}.shared_expert.{name}.weight")
                      for name in ("gate_proj", "up_proj", "down_proj")]
    return found


FAMILY = Family(("kimi_linear",), config_from_hf, hf_config, conversions)
