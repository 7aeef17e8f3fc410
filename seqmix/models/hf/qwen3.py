"""Qwen3 (`qwen3`, Qwen3ForCausalLM): Llama's attention model with an RMSNorm of each query and
key head before RoPE (`q_norm`, `k_norm`, weight [head_dim], plain w, the model's eps: seqmix's
attention with qk_norm "head"), a head_dim of its own (transformers' default 128 when the config
has none), no q/k/v biases, and sliding-window layers where `layer_types` says
"sliding_attention" (with use_sliding_window true and a sliding_window: transformers 5.24 nulls
sliding_window otherwise and cannot run such a layer, and seqmix refuses it). Without
layer_types, the layers from max_window_layers on slide when use_sliding_window, as transformers
derives them. Tensors have seqmix's names.
"""

from __future__ import annotations

from typing import Any

from seqmix.configuration import to_dict
from seqmix.mixers.attention import AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (Family, built, default_options, layer_mixers, require_options, require_plain,
                                     require_values, shortest_period)
from seqmix.models.hf.llama import rope
from seqmix.models.hf.tensors import CheckpointError

ARCHITECTURE = "Qwen3ForCausalLM"
LAYER_TYPES = ("full_attention", "sliding_attention")
DEFAULT_HEAD_DIM = 128  # Qwen3Config's, for a config.json without head_dim
DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen3Config's


def explicit_head_dim(hf: dict[str, Any], default: int) -> int | None:
    """ModelConfig.head_dim of a config whose class defaults head_dim to `default` (Qwen3's 128,
    Gemma's 256): None where it equals hidden_size / num_attention_heads."""
    value = hf.get("head_dim") or default
    return value if value * hf["num_attention_heads"] != hf["hidden_size"] else None


def rope_json(config: ModelConfig) -> dict[str, Any]:
    """The `rope_parameters` of a model: default RoPE, or Llama-3's scaling."""
    settings = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        settings = {**settings, "rope_type": "llama3", **to_dict(config.rope_scaling)}
    return settings


def _layer_windows(hf: dict[str, Any], source: str) -> list[int | None]:
    """Each layer's sliding window (None: global attention), as transformers' Qwen3Config derives them."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and index >= hf.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        else "full_attention" for index in range(layers)]
    if set(types) - set(LAYER_TYPES) or len(types) != layers:
        raise CheckpointError(f"{source}: layer_types must list {layers} of {', '.join(LAYER_TYPES)}, got {types}")
    if window is None and "sliding_attention" in types:  # transformers cannot build such a model either
        raise CheckpointError(f"{source}: layer_types lists sliding_attention, but use_sliding_window = "
                              f"{hf.get('use_sliding_window', False)!r} and sliding_window = "
                              f"{hf.get('sliding_window')!r} give no window")
    return [window if kind == "sliding_attention" else None for kind in types]


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu", "attention_bias": False})
    windows = _layer_windows(hf, source)
    kinds = {window: ("attention" if window is None else f"window_{window}") for window in set(windows)}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "head_dim": explicit_head_dim(hf, DEFAULT_HEAD_DIM), "mlp_hidden": hf["intermediate_size"],
        "layer_pattern": shortest_period([kinds[w] for w in windows]),
        "mixers": {kinds[window]: {"type": "attention", "qk_norm": "head", "sliding_window": window}
                   for window in set(windows)},
        "norm_eps": hf["rms_norm_eps"], "tie_embeddings": hf.get("tie_word_embeddings", False),
        **rope(hf, source),
    }, source)


def hf_config(config: ModelConfig, model_type: str = "qwen3") -> dict[str, Any]:
    require_plain(config, "Qwen3", allowed=("rope_scaling",))
    layers = layer_mixers(config, {"attention": "full_attention or sliding_attention"})
    for index, (_, options) in enumerate(layers):
        require_options(index, "attention", options, default_options(AttentionConfig, "sliding_window",
                                                                     qk_norm="head"), "Qwen3")
    windows = [options.sliding_window for _, options in layers]
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise CheckpointError(f"model.mixers: sliding windows of different sizes {sizes} have no Qwen3 equivalent "
                              "(its config holds one sliding_window)")
    if config.mlp_width == 0:
        raise CheckpointError("model.mlp_hidden: 0 has no Qwen3 equivalent (every block has an MLP)")
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head, "intermediate_size": config.mlp_width, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
        "rope_parameters": rope_json(config),
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
        "use_sliding_window": bool(sizes), "sliding_window": sizes[0] if sizes else None, "max_window_layers": 0,
    }


FAMILY = Family(("qwen3",), config_from_hf, hf_config)
