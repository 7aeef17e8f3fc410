"""Gemma (`gemma`, GemmaForCausalLM, Gemma 1): Llama's attention model with (1 + w) RMSNorms
(seqmix's norm_unit_offset), embeddings times sqrt(hidden_size), GeGLU MLPs (gelu_pytorch_tanh;
a config's legacy "gelu" means the same to transformers), a head_dim of its own (transformers'
default 256 when the config has none), biases on q, k, v and o together when attention_bias,
and a head tied to the embeddings unless tie_word_embeddings is false. Tensors have seqmix's names.

transformers 5.24 multiplies the embeddings by sqrt(hidden_size) cast to the weights' dtype
(float32 for float32 weights: not rounded to bfloat16 as RecurrentGemma's normaliser is); seqmix
multiplies by the Python float, which a bfloat16 model rounds to bfloat16 in the same way.

Gemma 2 is not imported: its layers need options seqmix's model has no place for (norms after
attention and after the MLP besides those before them, attention logits soft-capped, an
attention scale of query_pre_attn_scalar ** -0.5).
"""

from __future__ import annotations

import math
from typing import Any

from seqmix.mixers.attention import AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, default_options, layer_mixers, require_options,
                                     require_plain, same_options)
from seqmix.models.hf.llama import rope
from seqmix.models.hf.qwen3 import explicit_head_dim, rope_json
from seqmix.models.hf.tensors import CheckpointError

ARCHITECTURE = "GemmaForCausalLM"
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # transformers reads a config's "gelu" as the tanh approximation
DEFAULT_HEAD_DIM = 256  # GemmaConfig's, for a config.json without head_dim


def embedding_multiplier(d_model: int) -> float:
    """sqrt(d_model), Gemma's embedding scale."""
    return math.sqrt(d_model)


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("hidden_act", ACTIVATIONS[0]) not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act = {hf['hidden_act']!r} is not supported (only "
                              "'gelu_pytorch_tanh', or 'gelu', which transformers reads as it)")
    if hf.get("hidden_activation") not in (None, "gelu_pytorch_tanh"):  # transformers 4's name
        raise CheckpointError(f"{source}: hidden_activation = {hf['hidden_activation']!r} is not supported "
                              "(only 'gelu_pytorch_tanh')")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention = {hf['use_bidirectional_attention']!r} is "
                              "not supported (only causal attention)")
    bias = hf.get("attention_bias", False)
    d_model = hf["hidden_size"]
    return built({
        "vocab_size": hf["vocab_size"], "d_model": d_model, "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "head_dim": explicit_head_dim(hf, DEFAULT_HEAD_DIM), "mlp_hidden": hf["intermediate_size"],
        "mlp_activation": "gelu_tanh", "layer_pattern": ["attention"],
        "mixers": {"attention": {"type": "attention", "qkv_bias": bias, "output_bias": bias}},
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "norm_unit_offset": True,
        "tie_embeddings": hf.get("tie_word_embeddings", True), "embedding_multiplier": embedding_multiplier(d_model),
        **rope(hf, source),
    }, source)


def hf_config(config: ModelConfig, model_type: str = "gemma") -> dict[str, Any]:
    required = {"norm_unit_offset": True, "mlp_activation": "gelu_tanh"}
    require_plain(config, "Gemma", allowed=(*required, "embedding_multiplier", "rope_scaling"))
    for key, value in required.items():
        if getattr(config, key) != value:
            raise CheckpointError(f"model.{key}: {getattr(config, key)!r} has no Gemma equivalent (it needs {value!r})")
    scale = embedding_multiplier(config.d_model)
    if not math.isclose(config.embedding_multiplier, scale, rel_tol=1e-7):
        raise CheckpointError(f"model.embedding_multiplier: {config.embedding_multiplier!r} has no Gemma equivalent "
                              f"(it needs sqrt(d_model) = {scale!r})")
    if config.mlp_width == 0:
        raise CheckpointError("model.mlp_hidden: 0 has no Gemma equivalent (every block has an MLP)")
    layers = layer_mixers(config, {"attention": "attention"})
    for index, (_, options) in enumerate(layers):
        require_options(index, "attention", options, default_options(AttentionConfig, "qkv_bias", "output_bias"),
                        "Gemma")
        if options.qkv_bias != options.output_bias:
            raise CheckpointError(f"model.layers.{index}: attention with qkv_bias = {options.qkv_bias} and "
                                  f"output_bias = {options.output_bias} has no Gemma equivalent (its attention_bias "
                                  "puts biases on q, k, v and o together)")
    attention = same_options(layers, "attention")
    return {
        "architectures": [ARCHITECTURE], "model_type": "gemma", "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head, "intermediate_size": config.mlp_width, "hidden_act": "gelu_pytorch_tanh",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": attention.qkv_bias, "rope_parameters": rope_json(config), **NO_SPECIAL_TOKENS,
    }


FAMILY = Family(("gemma",), config_from_hf, hf_config)
