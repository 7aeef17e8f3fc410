"""Llama, Mistral and Qwen2: attention models whose tensors are seqmix's own under the same names."""

from __future__ import annotations

from typing import Any

import numpy as np

from seqmix.configuration import to_dict
from seqmix.mixers.attention import AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (Family, built, default_options, head_dim, layer_mixers, require_options,
                                     require_plain, require_values, rope_parameters, shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def rope(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling (ModelConfig options) of a config: default or Llama-3 RoPE."""
    parameters = rope_parameters(hf)
    theta = parameters.get("rope_theta", 10000.0)
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise CheckpointError(f"{source}: rope_type {kind!r} is not supported (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"rope_theta": theta, "rope_scaling": {key: parameters[key] for key in keys}}


def _layer_windows(hf: dict[str, Any], layers: int) -> list[int | None]:
    """The sliding window of each layer (None: global attention)."""
    window = hf.get("sliding_window")
    if "layer_types" in hf:
        return [window if kind == "sliding_attention" else None for kind in hf["layer_types"]]
    if hf["model_type"] == "qwen2":  # transformers 4: windows from layer max_window_layers on
        use = hf.get("use_sliding_window", False)
        return [window if use and index >= hf.get("max_window_layers", layers) else None for index in range(layers)]
    return [window] * layers


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False})
    layers = hf["num_hidden_layers"]
    windows = _layer_windows(hf, layers)
    attention = {"type": "attention", "qkv_bias": hf["model_type"] == "qwen2"}
    kinds = {window: ("attention" if window is None else f"window_{window}") for window in set(windows)}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": layers,
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "head_dim": head_dim(hf),
        "mlp_hidden": hf["intermediate_size"], "layer_pattern": shortest_period([kinds[w] for w in windows]),
        "mixers": {kinds[window]: {**attention, "sliding_window": window} for window in set(windows)},
        "norm_eps": hf["rms_norm_eps"], "tie_embeddings": hf.get("tie_word_embeddings", False),
        **rope(hf, source),
    }, source)


def _model_type(config: ModelConfig) -> str:
    """Qwen2 when the q/k/v projections have biases or the windows vary by layer, Mistral when
    every layer has the same window, Llama otherwise."""
    options = [options for _, options in layer_mixers(config, {"attention": "softmax attention"})]
    windows = {o.sliding_window for o in options}
    if any(o.qkv_bias for o in options) or len(windows) > 1:
        return "qwen2"
    return "llama" if windows == {None} else "mistral"


def hf_config(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """A Llama, Mistral or Qwen2 config.json (`model_type`; None: the one `_model_type` picks);
    Qwen2 with per-layer `layer_types` where windows vary (export then writes zero biases if the
    model has none)."""
    require_plain(config, "Llama, Mistral or Qwen2", allowed=("rope_scaling",))
    layers = layer_mixers(config, {"attention": "softmax attention"})
    for index, (_, options) in enumerate(layers):
        require_options(index, "attention", options, default_options(AttentionConfig, "sliding_window", "qkv_bias"),
                        "Llama, Mistral or Qwen2")
    model_type = model_type or _model_type(config)
    biases = {options.qkv_bias for _, options in layers}
    windows = [options.sliding_window for _, options in layers]
    if len(biases) > 1:
        raise CheckpointError("model.mixers: q/k/v biases in some attention layers only cannot be exported")
    if model_type == "qwen2":
        if len({w for w in windows if w is not None}) > 1:
            raise CheckpointError(f"model.mixers: sliding windows of different sizes {sorted(set(windows) - {None})} "
                                  "cannot be exported")
        layout = {"layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
                  "use_sliding_window": any(w is not None for w in windows),
                  "sliding_window": next((w for w in windows if w is not None), None), "max_window_layers": 0}
    elif biases == {True} or len(set(windows)) > 1 or (model_type == "llama" and windows[0] is not None):
        raise CheckpointError(f"model.mixers: {model_type} has neither q/k/v biases nor per-layer windows")
    else:
        layout = {"sliding_window": windows[0]} if model_type == "mistral" else {"attention_bias": False,
                                                                                  "mlp_bias": False}
    rope_settings = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope_settings = {**rope_settings, "rope_type": "llama3", **to_dict(config.rope_scaling)}
    return {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head, "intermediate_size": config.mlp_width, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope_settings, **layout,
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    """None, except that Qwen2 always has q/k/v biases: an attention model without them exports
    zero ones, and reads them back only if they are still zero."""
    layers = [config.mixer(kind) for kind in config.layer_kinds()]
    if hf["model_type"] != "qwen2" or any(spec.name != "attention" or options.qkv_bias for spec, options in layers):
        return []

    def dropped(name: str, width: int) -> Conversion:
        def to_ours(arrays):
            if np.any(arrays[0]):
                raise CheckpointError(f"tensor {name} holds non-zero biases, which the model has no place for")
            return []
        return Conversion((name,), (), to_ours, lambda arrays: [np.zeros((width,), np.float32)])

    widths = {"q_proj": config.n_heads * config.dim_per_head, "k_proj": config.kv_heads * config.dim_per_head,
              "v_proj": config.kv_heads * config.dim_per_head}
    return [dropped(f"model.layers.{index}.self_attn.{name}.bias", width)
            for index in range(config.n_layers) for name, width in widths.items()]


FAMILY = Family(tuple(ARCHITECTURES), config_from_hf, hf_config, conversions)
