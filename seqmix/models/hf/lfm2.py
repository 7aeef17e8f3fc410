"""Liquid's LFM2 (`lfm2`): gated short convolution layers (seqmix's `gated_conv` with its input
gate) among a few attention layers whose q and k have per-head RMSNorms, SwiGLU MLPs of a width
that the config derives, plain RMSNorms, embeddings tied to the head by default.

Config: the layers are `layer_types` ("conv" / "full_attention"), else those of `full_attn_idxs`
are attention and the rest convolutions, else all attention (transformers' defaults);
LFM2's own names `tie_embedding` and `block_ff_dim` (its hub configs') win over
tie_word_embeddings and intermediate_size, as in transformers.
The MLP width follows transformers' rule: with block_auto_adjust_ff_dim, int(2 I / 3), then with
block_ffn_dim_multiplier m, int(m . ) rounded up to a multiple of block_multiple_of. Export writes
the width itself (block_auto_adjust_ff_dim false).

Hub layout against seqmix: a layer's norms are `operator_norm` and `ffn_norm` (seqmix:
input_layernorm, post_attention_layernorm), its MLP `feed_forward.w1/w3/w2` (gate_proj, up_proj,
down_proj), the final norm `model.embedding_norm` (model.norm). Convolution layers are `conv`
(seqmix: self_attn): `in_proj` [3D, D] with rows [B | C | x] (b_proj, g_proj, v_proj), the filter
`conv` [D, 1, K] (seqmix's [K, D], taps reversed), `out_proj` (o_proj), all with biases when
conv_bias. Attention layers name their q/k norms `q_layernorm`/`k_layernorm` and their output
projection `out_proj`.
"""

from __future__ import annotations

from typing import Any

from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, head_dim, layer_mixers, read, require_options,
                                     require_plain, rope_parameters, same_options, shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split

DEFAULT_ROPE_THETA = 1000000.0  # Lfm2Config.default_theta
KINDS = {"conv": "conv", "full_attention": "full"}


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        attention = hf.get("full_attn_idxs")
        attention = range(layers) if attention is None else attention
        types = ["full_attention" if i in attention else "conv" for i in range(layers)]
    if set(types) - set(KINDS) or len(types) != layers:
        raise CheckpointError(f"{source}: layer_types must list {layers} of {', '.join(KINDS)}, got {types}")
    return types


def mlp_width(hf: dict[str, Any], source: str) -> int:
    """The MLP width of a config: block_ff_dim (LFM2's own name, which transformers prefers) or
    intermediate_size, by transformers' rule."""
    width = read(hf, source, "block_ff_dim", "intermediate_size")
    if hf.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = hf.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            multiple = hf.get("block_multiple_of", 256)
            width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    return width


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    conv = {"type": "gated_conv", "input_gate": True, "width": hf.get("conv_L_cache", 3),
            "bias": hf.get("conv_bias", False)}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"), "head_dim": head_dim(hf),
        "mlp_hidden": mlp_width(hf, source),
        "layer_pattern": shortest_period([KINDS[kind] for kind in _layer_types(hf, source)]),
        "mixers": {"conv": conv, "full": {"type": "attention", "qk_norm": "head"}},
        "rope_theta": rope.get("rope_theta", DEFAULT_ROPE_THETA), "norm_eps": hf.get("norm_eps", 1e-5),
        "tie_embeddings": read(hf, source, "tie_embedding", "tie_word_embeddings", default=True),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    require_plain(config, "LFM2")
    layers = layer_mixers(config, {"gated_conv": "conv", "attention": "full_attention"})
    conv = same_options(layers, "gated_conv")
    for index, (name, options) in enumerate(layers):
        expected = ({"input_gate": True} if name == "gated_conv" else
                    {"qk_norm": "head", "output_gate": False, "sliding_window": None, "qkv_bias": False,
                     "rotary_fraction": 1.0})
        require_options(index, name, options, expected, "LFM2")
    types = ["conv" if name == "gated_conv" else "full_attention" for name, _ in layers]
    return {
        "architectures": ["Lfm2ForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head, "intermediate_size": config.mlp_width,
        "block_auto_adjust_ff_dim": False, "norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        **NO_SPECIAL_TOKENS, "layer_types": types,
        "full_attn_idxs": [index for index, kind in enumerate(types) if kind == "full_attention"],
        "conv_L_cache": conv.width if conv else 3, "conv_bias": bool(conv and conv.bias),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    d_model = config.d_model
    found = [renamed("model.embedding_norm.weight", "model.norm.weight")]
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        found += [renamed(f"{layer}.operator_norm.weight", f"{layer}.input_layernorm.weight"),
                  renamed(f"{layer}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight"),
                  *(renamed(f"{layer}.feed_forward.{hub}.weight", f"{layer}.mlp.{ours}.weight")
                    for hub, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")))]
        hub, ours = f"{layer}.conv", f"{layer}.self_attn"
        if spec.name == "attention":
            found += [renamed(f"{ours}.q_layernorm.weight", f"{ours}.q_norm.weight"),
                      renamed(f"{ours}.k_layernorm.weight", f"{ours}.k_norm.weight"),
                      renamed(f"{ours}.out_proj.weight", f"{ours}.o_proj.weight")]
            continue
        for suffix in ("weight", "bias") if options.bias else ("weight",):
            found += [split([f"{hub}.in_proj.{suffix}"], [f"{ours}.{name}.{suffix}" for name in ("b_proj", "g_proj",
                                                                                              "v_proj")],
                            [d_model] * 3),
                      renamed(f"{hub}.out_proj.{suffix}", f"{ours}.o_proj.{suffix}")]
        found.append(split([f"{hub}.conv.weight"], [f"{ours}.conv.weight"], [d_model], conv=True))
        if options.bias:
            found.append(renamed(f"{hub}.conv.bias", f"{ours}.conv.bias"))
    return found


FAMILY = Family(("lfm2",), config_from_hf, hf_config, conversions)
