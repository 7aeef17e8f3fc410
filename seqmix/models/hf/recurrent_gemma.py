"""RecurrentGemma (`recurrent_gemma`, Griffin): recurrent blocks (the RG-LRU, seqmix's `rg_lru`)
and local attention layers in the order of `block_types`, repeated and cut to num_hidden_layers
(so 26 layers of [recurrent, recurrent, attention] end on two recurrent ones); (1 + w) RMSNorms;
GeGLU MLPs with biases, of width intermediate_size / 2; embeddings times sqrt(hidden_size)
rounded to bfloat16; logits soft-capped at logits_soft_cap; a head tied to the embeddings (unless
tie_word_embeddings is false).

The attention layers see the last attention_window_size tokens, with grouped keys and values,
RoPE on the first partial_rotary_factor (0.5 unless set) of each head, q/k/v biases when
attention_bias and an o_proj bias always. transformers ignores a config's head_dim (it is always
hidden_size / num_attention_heads), and the RG-LRU's gates have num_attention_heads blocks.

Hub layout against seqmix: each layer's mixer is `temporal_block` (seqmix: `self_attn`, whose
recurrent block keeps the hub's names: linear_x, linear_y, linear_out, conv_1d, rg_lru.*), its
norms `temporal_pre_norm` and `channel_pre_norm` (seqmix: `input_layernorm`,
`post_attention_layernorm`), its MLP `mlp_block`, the final norm `final_norm`; the convolution is
a torch depthwise [C, 1, K] (seqmix: [K, C]).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from seqmix.models.config import ModelConfig
from seqmix.mixers.attention import AttentionConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, default_options, layer_mixers, read,
                                     require_options, require_plain, require_values, rope_parameters, same_options,
                                     shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split

KINDS = {"recurrent": "rg_lru", "attention": "attention"}  # block_types' names -> seqmix's mixers
BLOCK_TYPES = {mixer: kind for kind, mixer in KINDS.items()}
DEFAULT_BLOCK_TYPES = ["recurrent", "recurrent", "attention"]
DEFAULT_ROTARY_FRACTION = 0.5  # transformers' default partial_rotary_factor for this family


def embedding_multiplier(d_model: int) -> float:
    """sqrt(d_model) rounded to bfloat16, as transformers' `normalizer` buffer holds it."""
    return float(jnp.asarray(math.sqrt(d_model), jnp.bfloat16))


def _block_types(hf: dict[str, Any], source: str) -> list[str]:
    """Each layer's block type: block_types repeated and cut to num_hidden_layers."""
    types = list(hf.get("block_types") or DEFAULT_BLOCK_TYPES)
    if set(types) - set(KINDS):
        raise CheckpointError(f"{source}: block_types must list {' or '.join(KINDS)}, got {types}")
    layers = read(hf, source, "num_hidden_layers")
    return (types * -(-layers // len(types)))[:layers]


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_activation": "gelu_pytorch_tanh"})
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    d_model, heads = read(hf, source, "hidden_size"), read(hf, source, "num_attention_heads")
    types = _block_types(hf, source)
    kinds = shortest_period(types)
    window = read(hf, source, "attention_window_size", "sliding_window", default=2048)
    mixers = {"recurrent": {"type": "rg_lru", "num_heads": heads, "lru_width": hf.get("lru_width") or d_model,
                            "conv_width": hf.get("conv1d_width", 4)},
              "attention": {"type": "attention", "sliding_window": window, "qkv_bias": hf.get("attention_bias", False),
                            "output_bias": True,
                            "rotary_fraction": rope.get("partial_rotary_factor", DEFAULT_ROTARY_FRACTION)}}
    return built({
        "vocab_size": read(hf, source, "vocab_size"), "d_model": d_model, "n_layers": len(types),
        "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads"),
        "mlp_hidden": read(hf, source, "intermediate_size") // 2, "mlp_activation": "gelu_tanh", "mlp_bias": True,
        "layer_pattern": kinds, "mixers": {kind: options for kind, options in mixers.items() if kind in kinds},
        "rope_theta": rope.get("rope_theta", 10000.0), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "norm_unit_offset": True, "tie_embeddings": hf.get("tie_word_embeddings", True),
        "embedding_multiplier": embedding_multiplier(d_model), "logit_soft_cap": hf.get("logits_soft_cap", 30.0),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    required = {"norm_unit_offset": True, "mlp_activation": "gelu_tanh", "mlp_bias": True,
                "embedding_multiplier": embedding_multiplier(config.d_model)}
    require_plain(config, "RecurrentGemma", allowed=(*required, "logit_soft_cap"))
    for key, value in required.items():
        if getattr(config, key) != value:
            raise CheckpointError(f"model.{key}: {getattr(config, key)!r} has no RecurrentGemma equivalent "
                                  f"(it needs {value!r})")
    if (config.logit_soft_cap is None or config.mlp_width == 0
            or config.dim_per_head != config.d_model // config.n_heads):
        raise CheckpointError("model: RecurrentGemma soft-caps its logits, has an MLP in every block and heads of "
                              "d_model / n_heads (logit_soft_cap set, mlp_hidden > 0, no head_dim of its own)")
    layers = layer_mixers(config, BLOCK_TYPES)
    recurrent, local = same_options(layers, "rg_lru"), same_options(layers, "attention")
    for index, (name, options) in enumerate(layers):
        if name == "rg_lru" and (options.num_heads or config.n_heads) != config.n_heads:
            raise CheckpointError(f"model.layers.{index}: rg_lru with num_heads = {options.num_heads} has no "
                                  f"RecurrentGemma equivalent (its gates have n_heads = {config.n_heads} blocks)")
        if name == "attention":
            expected = default_options(AttentionConfig, "sliding_window", "qkv_bias", "rotary_fraction",
                                       output_bias=True)
            require_options(index, name, options, expected, "RecurrentGemma")
            if options.sliding_window is None:
                raise CheckpointError(f"model.layers.{index}: RecurrentGemma's attention is local (it needs a "
                                      "sliding_window)")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "intermediate_size": 2 * config.mlp_width,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "logits_soft_cap": config.logit_soft_cap,
        **NO_SPECIAL_TOKENS,
        "block_types": shortest_period([BLOCK_TYPES[name] for name, _ in layers]),
        "lru_width": (recurrent and recurrent.lru_width) or config.d_model,
        "conv1d_width": recurrent.conv_width if recurrent else 4,
        "attention_window_size": local.sliding_window if local else 2048,
        "attention_bias": bool(local and local.qkv_bias),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": local.rotary_fraction if local else DEFAULT_ROTARY_FRACTION},
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    """Every tensor is renamed, save the convolutions, also transposed (parameters a layer does
    not have, such as q_proj's bias without attention_bias, drop out of the checkpoint's plan)."""
    found = [renamed("model.final_norm.weight", "model.norm.weight")]
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        hub, ours = f"{layer}.temporal_block", f"{layer}.self_attn"
        found += [renamed(f"{layer}.temporal_pre_norm.weight", f"{layer}.input_layernorm.weight"),
                  renamed(f"{layer}.channel_pre_norm.weight", f"{layer}.post_attention_layernorm.weight"),
                  *(renamed(f"{layer}.mlp_block.{name}.{part}", f"{layer}.mlp.{name}.{part}")
                    for name in ("gate_proj", "up_proj", "down_proj") for part in ("weight", "bias"))]
        if spec.name == "rg_lru":
            width = options.lru_width or config.d_model
            names = [f"{projection}.{part}" for projection in ("linear_x", "linear_y", "linear_out")
                     for part in ("weight", "bias")]
            names += ["conv_1d.bias", *(f"rg_lru.{name}" for name in (
                "recurrent_param", "input_gate_weight", "input_gate_bias", "recurrent_gate_weight",
                "recurrent_gate_bias"))]
            found.append(split([f"{hub}.conv_1d.weight"], [f"{ours}.conv_1d.weight"], [width], conv=True))
        else:
            names = [f"{projection}.{part}" for projection in ("q_proj", "k_proj", "v_proj", "o_proj")
                     for part in ("weight", "bias")]
        found += [renamed(f"{hub}.{name}", f"{ours}.{name}") for name in names]
    return found


FAMILY = Family(("recurrent_gemma",), config_from_hf, hf_config, conversions)
