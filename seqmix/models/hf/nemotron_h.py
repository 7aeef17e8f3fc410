"""NVIDIA Nemotron-H (`nemotron_h`): pre-norm blocks of one RMSNorm and one mixer each (no MLP:
ModelConfig.mlp_hidden 0), the mixer one of four kinds, from `layers_block_type` (its alias
`layer_types`), else the hub's `hybrid_override_pattern` (one character a layer), else
transformers' default:

    M  linear_attention  Mamba2 (`mamba2`): grouped B/C, an SSM width of mamba_num_heads *
                         mamba_head_dim, dt clamped below at time_step_min, the gate before its
                         grouped output norm, conv bias (use_conv_bias), projection biases (use_bias)
    *  full_attention    grouped-query attention without positions, head_dim of its own, no biases
    -  mlp               down(relu(up x)^2) (`mlp` mixer), intermediate_size wide
    E  moe               sigmoid routing with a selection bias, expert groups (n_group, topk_group),
                         renormalised (norm_topk_prob) and scaled (routed_scaling_factor) weights;
                         ungated squared-ReLU experts, optionally in a latent space (moe_latent_size);
                         an ungated squared-ReLU shared expert on the block's input (`moe` mixer)

Config keys under their older names too: mamba_n_groups, mamba_d_conv, mamba_dt_min,
mamba_conv_bias and mamba_chunk_size (which win over n_groups, conv_kernel, time_step_min,
use_conv_bias and chunk_size, as in transformers), num_local_experts for n_routed_experts. As in
transformers 5.24, the length of the layer list is the number of layers (num_hidden_layers is not
read), the head is never tied to the embeddings, and time_step_limit (mamba_dt_limit),
attention_bias, sliding_window and n_shared_experts are not read: the Mamba layers clamp dt to
[time_step_min, inf), the attention layers have no biases and see every earlier token, and an
experts layer has one shared expert, moe_shared_expert_intermediate_size wide. transformers'
forward clamps dt there but its decode step does not, so its cached generation drifts from its
own forward; seqmix clamps in both. chunk_size is rounded up to a multiple of 16
(`mamba2.chunk_size`). Biases on the MLPs (mlp_bias), which no released checkpoint has, are refused.

Hub layout against seqmix: everything under `backbone.` (seqmix: `model.`), embeddings
`embeddings`, final norm `norm_f`, each block `layers.N.norm` and `layers.N.mixer` (seqmix:
`input_layernorm`, `self_attn`); Mamba as in `mamba2`; attention `q_proj` ... `o_proj`; an MLP
layer's `up_proj`, `down_proj` (seqmix: `self_attn.mlp.*`); an experts layer's router `gate.weight`
and `gate.e_score_correction_bias`, experts `experts.E.up_proj` / `down_proj`, `fc1_latent_proj`,
`fc2_latent_proj`, `shared_experts.*` (seqmix: `self_attn.experts.` router, selection_bias, stacked
up_proj / down_proj, the latent projections, `shared_expert.*`). Multi-token prediction tensors
(`mtp.*`) are not the language model's and are skipped.
"""

from __future__ import annotations

import math
from typing import Any

from seqmix.mixers.attention import AttentionConfig
from seqmix.mixers.feed_forward import ExpertsConfig, MLPConfig
from seqmix.mixers.mamba2 import Mamba2Config
from seqmix.models.config import ModelConfig
from seqmix.models.hf import mamba2
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, default_options, layer_mixers, read,
                                     require_options, require_plain, require_values, same_options, shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, stacked

# layers_block_type's names -> seqmix's layer kinds, and hybrid_override_pattern's characters
KINDS = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
CHARACTERS = {kind: character for character, kind in PATTERN.items()}
# seqmix's mixer -> layers_block_type's name (export writes it and the pattern, for readers of either)
MIXERS = {"mamba2": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
DEFAULT_LAYERS = ["linear_attention", "moe", "full_attention", "mlp"]  # transformers' default


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    types = read(hf, source, "layers_block_type", "layer_types", default=None)
    if types is None and "hybrid_override_pattern" in hf:
        pattern = hf["hybrid_override_pattern"]
        unknown = sorted(set(pattern) - set(PATTERN))
        if unknown:
            raise CheckpointError(f"{source}: hybrid_override_pattern {pattern!r} holds {', '.join(unknown)} (its "
                                  f"layers are {', '.join(f'{c} ({kind})' for c, kind in PATTERN.items())})")
        types = [PATTERN[character] for character in pattern]
    types = DEFAULT_LAYERS if types is None else types
    if not types or set(types) - set(KINDS):
        raise CheckpointError(f"{source}: layers_block_type must list layers of {', '.join(KINDS)}, got {types}")
    return types


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"mamba_hidden_act": "silu", "mlp_hidden_act": "relu2", "mlp_bias": False})
    types = _layer_types(hf, source)
    d_model, heads = read(hf, source, "hidden_size", default=4096), read(hf, source, "num_attention_heads", default=32)
    kv_heads, head_dim = hf.get("num_key_value_heads") or heads, read(hf, source, "head_dim", default=128)
    bias = hf.get("use_bias", False)
    mixers = {
        "mamba": {"type": "mamba2", "state_dim": read(hf, source, "ssm_state_size", default=128),
                  "conv_width": read(hf, source, "mamba_d_conv", "conv_kernel", default=4),
                  "num_heads": read(hf, source, "mamba_num_heads", default=128),
                  "head_dim": read(hf, source, "mamba_head_dim", default=64),
                  "n_groups": read(hf, source, "mamba_n_groups", "n_groups", default=8),
                  "time_step_limit": [read(hf, source, "mamba_dt_min", "time_step_min", default=0.001), math.inf],
                  "conv_bias": read(hf, source, "mamba_conv_bias", "use_conv_bias", default=True),
                  "in_proj_bias": bias, "out_proj_bias": bias,
                  "chunk_size": mamba2.chunk_size(read(hf, source, "mamba_chunk_size", "chunk_size", default=128))},
        "attention": {"type": "attention", "rotary_fraction": 0.0},
        "mlp": {"type": "mlp", "hidden": read(hf, source, "intermediate_size", default=21504)},
        "moe": {"type": "moe", "num_experts": read(hf, source, "n_routed_experts", "num_local_experts", default=8),
                "top_k": read(hf, source, "num_experts_per_tok", default=2),
                "expert_hidden": read(hf, source, "moe_intermediate_size", default=7688),
                "activation": "relu2", "gated": False, "latent_size": hf.get("moe_latent_size"),
                "scoring": "sigmoid", "renormalize": read(hf, source, "norm_topk_prob", default=True),
                "selection_bias": True, "expert_groups": read(hf, source, "n_group", default=1),
                "groups_per_token": read(hf, source, "topk_group", default=1),
                "routed_scale": read(hf, source, "routed_scaling_factor", default=1.0),
                "shared_hidden": read(hf, source, "moe_shared_expert_intermediate_size", default=7688)},
    }
    kinds = [KINDS[kind] for kind in types]
    return built({
        "vocab_size": read(hf, source, "vocab_size", default=131072), "d_model": d_model, "n_layers": len(types),
        "n_heads": heads, "n_kv_heads": None if kv_heads == heads else kv_heads,
        "head_dim": None if head_dim * heads == d_model else head_dim, "mlp_hidden": 0,
        "layer_pattern": shortest_period(kinds),
        "mixers": {kind: options for kind, options in mixers.items() if kind in kinds},
        "norm_eps": read(hf, source, "layer_norm_epsilon", default=1e-5),
        "tie_embeddings": False,  # transformers' Nemotron-H has a head of its own, whatever tie_word_embeddings says
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    require_plain(config, "Nemotron-H")
    if config.mlp_width or config.tie_embeddings:
        raise CheckpointError("model: Nemotron-H's blocks are a norm and one mixer, its feed-forward layers layers of "
                              "their own, and its head is its own (mlp_hidden 0, tie_embeddings false)")
    layers = layer_mixers(config, MIXERS)
    mamba, mlp, moe = (same_options(layers, name) for name in ("mamba2", "mlp", "moe"))
    expected = {
        "mamba2": default_options(Mamba2Config, "state_dim", "conv_width", "num_heads", "head_dim", "n_groups",
                                  "time_step_limit", "conv_bias", "in_proj_bias", "out_proj_bias", "chunk_size",
                                  "expand", "norm_eps"),
        "attention": default_options(AttentionConfig, rotary_fraction=0.0),
        "mlp": default_options(MLPConfig, "hidden"),
        "moe": default_options(ExpertsConfig, "num_experts", "top_k", "expert_hidden", "latent_size", "renormalize",
                               "expert_groups", "groups_per_token", "routed_scale", "shared_hidden",
                               "load_balance_weight", activation="relu2", gated=False, scoring="sigmoid",
                               selection_bias=True),
    }
    for index, (name, options) in enumerate(layers):
        require_options(index, name, options, expected[name], "Nemotron-H")
        if name == "mamba2":  # dt clamped below only; both projection biases or neither
            require_options(index, name, options, {"time_step_limit": [options.time_step_limit[0], math.inf],
                                                   "out_proj_bias": options.in_proj_bias}, "Nemotron-H")
            if options.norm_eps not in (None, config.norm_eps):
                raise CheckpointError(f"model.layers.{index}: mamba2 with norm_eps = {options.norm_eps} has no "
                                      f"Nemotron-H equivalent (its norms share layer_norm_epsilon = {config.norm_eps})")
    hf = {"architectures": ["NemotronHForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
          "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
          "layers_block_type": [MIXERS[name] for name, _ in layers],
          "hybrid_override_pattern": "".join(CHARACTERS[MIXERS[name]] for name, _ in layers),
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
          "head_dim": config.dim_per_head, "mlp_hidden_act": "relu2", "mlp_bias": False, "mamba_hidden_act": "silu",
          "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": False, **NO_SPECIAL_TOKENS}
    if mamba is not None:
        heads, head_dim = mamba.heads(config)
        hf |= {"mamba_num_heads": heads, "mamba_head_dim": head_dim, "ssm_state_size": mamba.state_dim,
               "n_groups": mamba.n_groups, "conv_kernel": mamba.conv_width, "chunk_size": mamba.chunk_size,
               "time_step_min": mamba.time_step_limit[0], "use_conv_bias": mamba.conv_bias,
               "use_bias": mamba.in_proj_bias}
    if mlp is not None:
        hf["intermediate_size"] = mlp.hidden
    if moe is not None:
        hf |= {"n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
               "moe_intermediate_size": moe.expert_hidden, "moe_latent_size": moe.latent_size,
               "norm_topk_prob": moe.renormalize, "n_group": moe.expert_groups, "topk_group": moe.groups_per_token,
               "routed_scaling_factor": moe.routed_scale, "moe_shared_expert_intermediate_size": moe.shared_hidden}
    return hf


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = mamba2.backbone_names(config)
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        hub, ours = f"{layer}.mixer", f"{layer}.self_attn"
        if spec.name == "mamba2":
            found += mamba2.mixer_conversions(hub, ours, options, config)
        elif spec.name == "attention":
            found += [renamed(f"{hub}.{name}.weight", f"{ours}.{name}.weight")
                      for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif spec.name == "mlp":
            found += [renamed(f"{hub}.{name}.weight", f"{ours}.mlp.{name}.weight") for name in ("up_proj", "down_proj")]
        else:
            experts = f"{ours}.experts"
            found += [renamed(f"{hub}.gate.weight", f"{experts}.router.weight"),
                      renamed(f"{hub}.gate.e_score_correction_bias", f"{experts}.selection_bias"),
                      *(stacked(f"{hub}.experts.{{}}.{name}.weight", f"{experts}.{name}", options.num_experts)
                        for name in ("up_proj", "down_proj")),
                      *(renamed(f"{hub}.{name}.weight", f"{experts}.{name}.weight")
                        for name in ("fc1_latent_proj", "fc2_latent_proj")),
                      *(renamed(f"{hub}.shared_experts.{name}.weight", f"{experts}.shared_expert.{name}.weight")
                        for name in ("up_proj", "down_proj"))]
    return found


FAMILY = Family(("nemotron_h",), config_from_hf, hf_config, conversions, ignored=("mtp.",), prefix="backbone.")
