"""Mamba-2 language models (`mamba2`): pre-norm blocks of an RMSNorm and a Mamba2 mixer (no MLP:
ModelConfig.mlp_hidden 0), the mixer with grouped B/C, an SSM width of num_heads * head_dim, a
dt clamp (`time_step_limit`), a convolution bias, optional projection biases and the gate applied
before its grouped output norm; tied head when tie_word_embeddings.

Hub layout against seqmix: everything under `backbone.` (seqmix: `model.`), the embeddings
`backbone.embeddings` (older checkpoints: `embedding`; seqmix: `embed_tokens`), the final norm
`norm_f` (seqmix: `norm`), each block `layers.N.norm` (seqmix: `input_layernorm`) and
`layers.N.mixer` (seqmix: `self_attn`), whose convolution is `conv1d` [C, 1, K] (seqmix: `conv`
[K, C]). `mixer_conversions` serves every family with this mixer (Falcon-H1, Nemotron-H).

seqmix's chunked op takes chunks of a multiple of 16 tokens: a config's chunk_size is rounded up
to one (the result does not depend on it; export writes seqmix's).
"""

from __future__ import annotations

import math
from typing import Any

from seqmix.mixers.mamba2 import Mamba2Config
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, float_json, json_float, layer_mixers,
                                     require_options, require_plain, require_values,
                                     same_options)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split

MIXER_TENSORS = ("in_proj.weight", "in_proj.bias", "A_log", "dt_bias", "D", "norm.weight", "out_proj.weight",
                 "out_proj.bias")


def chunk_size(value: int) -> int:
    """seqmix's chunk size for a config's: the nearest multiple of 16 at or above it."""
    return max(16, -(-value // 16) * 16)


def time_step_limit(hf: dict[str, Any], source: str, key: str = "time_step_limit") -> list[float]:
    """The [low, high] dt clamp of a config (absent: none, [0, inf]), infinities in either JSON form."""
    value = hf.get(key, [0.0, math.inf])
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise CheckpointError(f"{source}: {key} must be [low, high], got {value!r}")
    return [json_float(bound, source, key) for bound in value]


def mixer_conversions(hub: str, ours: str, options: Mamba2Config, model_config: ModelConfig) -> list[Conversion]:
    """The tensors of a Mamba2 mixer at hub path `hub` (e.g. `model.layers.0.mixer`) against the
    seqmix mixer at `ours`: the convolution [C, 1, K] <-> [K, C], its bias, and the rest by name
    (biases and the norm only where the model has them)."""
    heads, head_dim = options.heads(model_config)
    channels = heads * head_dim + 2 * options.n_groups * options.state_dim
    return [split([f"{hub}.conv1d.weight"], [f"{ours}.conv.weight"], [channels], conv=True),
            renamed(f"{hub}.conv1d.bias", f"{ours}.conv.bias"),
            *(renamed(f"{hub}.{name}", f"{ours}.{name}") for name in MIXER_TENSORS)]


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu"})
    # Absent keys take transformers' Mamba2Config defaults.
    d_model, heads, head_dim = hf["hidden_size"], hf.get("num_heads", 128), hf.get("head_dim", 64)
    expand = hf.get("expand", 2)
    if expand * d_model != heads * head_dim:
        raise CheckpointError(f"{source}: expand * hidden_size = {expand * d_model} must equal num_heads * head_dim "
                              f"= {heads * head_dim}")
    bias = hf.get("use_bias", False)
    mixer = {"type": "mamba2", "state_dim": hf.get("state_size", 128), "conv_width": hf.get("conv_kernel", 4),
             "num_heads": heads, "head_dim": head_dim, "n_groups": hf.get("n_groups", 8),
             "time_step_limit": time_step_limit(hf, source), "conv_bias": hf.get("use_conv_bias", True),
             "in_proj_bias": bias, "out_proj_bias": bias, "chunk_size": chunk_size(hf.get("chunk_size", 256))}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": d_model, "n_layers": hf["num_hidden_layers"],
        "n_heads": 1,  # no attention: the mixer has its own heads
        "mlp_hidden": 0, "layer_pattern": ["mamba2"], "mixers": {"mamba2": mixer},
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", False),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    require_plain(config, "Mamba-2")
    if config.mlp_width:
        raise CheckpointError(f"model.mlp_hidden: {config.mlp_width} has no Mamba-2 equivalent (its blocks have no "
                              "MLP: it needs 0)")
    layers = layer_mixers(config, {"mamba2": "mixer"})
    options = same_options(layers, "mamba2")  # every layer's, so layer 0 speaks for all
    require_options(0, "mamba2", options, {"output_norm": "gate_then_norm", "in_proj_multipliers": [1.0] * 5,
                                           "out_proj_bias": options.in_proj_bias}, "Mamba-2")
    if options.norm_eps not in (None, config.norm_eps):
        raise CheckpointError(f"model.layers.0: mamba2 with norm_eps = {options.norm_eps} has no Mamba-2 equivalent "
                              f"(its norms share layer_norm_epsilon = {config.norm_eps})")
    heads, head_dim = options.heads(config)
    if heads * head_dim % config.d_model:
        raise CheckpointError(f"model.mixers: Mamba-2's SSM width is expand * hidden_size, not {heads * head_dim} "
                              f"for hidden_size {config.d_model}")
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "num_heads": heads, "head_dim": head_dim,
        "expand": heads * head_dim // config.d_model, "state_size": options.state_dim, "n_groups": options.n_groups,
        "conv_kernel": options.conv_width, "use_conv_bias": options.conv_bias, "use_bias": options.in_proj_bias,
        "time_step_limit": [float_json(bound) for bound in options.time_step_limit],
        "chunk_size": options.chunk_size, "hidden_act": "silu", "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, **NO_SPECIAL_TOKENS,
    }


def backbone_names(config: ModelConfig) -> list[Conversion]:
    """The `backbone.` layout's names (Mamba-2, Nemotron-H) for seqmix's embeddings, final norm and
    block norms: `embeddings`, `norm_f`, `layers.N.norm`."""
    return [renamed("model.embeddings.weight", "model.embed_tokens.weight"),
            renamed("model.norm_f.weight", "model.norm.weight"),
            *(renamed(f"model.layers.{index}.norm.weight", f"model.layers.{index}.input_layernorm.weight")
              for index in range(config.n_layers))]


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = backbone_names(config)
    for index, kind in enumerate(config.layer_kinds()):
        _, options = config.mixer(kind)
        found += mixer_conversions(f"model.layers.{index}.mixer", f"model.layers.{index}.self_attn", options, config)
    return found


FAMILY = Family(("mamba2",), config_from_hf, hf_config, conversions, prefix="backbone.",
                old_names=(("backbone.embedding.", "backbone.embeddings."),))
