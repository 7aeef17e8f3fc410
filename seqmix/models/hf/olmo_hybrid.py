"""OLMo-hybrid (`olmo_hybrid`): pre-norm Gated DeltaNet layers (separate projections, a SiLU output
gate `g_proj`, negative eigenvalues as an option, an output norm whose eps is always 1e-5) and
post-norm attention layers whose q/k RMSNorms span the whole projection, with RoPE or none.

Hub layout against seqmix: the linear layers are `linear_attn` (seqmix: `self_attn`) with the
projections under seqmix's names and the convolutions as `q_conv1d`, `k_conv1d`, `v_conv1d`
[C, 1, K] (seqmix: `q_conv`, ... [K, C]); their block norms are `attention_layer_norm` and
`feedforward_layer_norm` (seqmix: `input_layernorm`, `post_attention_layernorm`), and the
attention layers' post-attention norm is `feedforward_layer_norm` too. transformers 5.24's
`save_pretrained` cuts the fused convolution into three equal thirds whatever the widths of q, k
and v; the importer reads the three as one, so both that and the true widths load, and export
writes the true widths.
"""

from __future__ import annotations

from typing import Any

from seqmix.mixers.attention import AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, default_options, head_dim, layer_mixers, read,
                                     require_options, require_plain, require_values, rope_parameters, same_options,
                                     shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split

OUTPUT_NORM_EPS = 1e-5  # the linear layers' output norm (fla's FusedRMSNormGated default), whatever rms_norm_eps
KINDS = {"linear_attention": "linear", "full_attention": "full"}


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers' default: every fourth layer attention, and at least the last
        types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]
        if "full_attention" not in types:
            types[-1] = "full_attention"
    if set(types) - set(KINDS) or len(types) != layers:
        raise CheckpointError(f"{source}: layer_types must list {layers} of {', '.join(KINDS)}, got {types}")
    return types


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu", "attention_bias": False})
    heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    key_heads = hf.get("linear_num_key_heads") or heads
    key_dim = hf.get("linear_key_head_dim") or int(0.75 * d_model / key_heads)
    value_dim = hf.get("linear_value_head_dim") or 2 * key_dim
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    theta = rope.get("rope_theta")  # None: no positions at all (the released checkpoints)
    linear = {"type": "gated_deltanet", "num_heads": key_heads, "head_dim": key_dim,
              "num_v_heads": hf.get("linear_num_value_heads") or heads, "expand_v": value_dim / key_dim,
              "conv_width": hf.get("linear_conv_kernel_dim", 4), "output_norm_eps": OUTPUT_NORM_EPS,
              "negative_eigenvalues": hf.get("linear_allow_neg_eigval", False)}
    full = {"type": "attention", "qk_norm": "projection", "rotary_fraction": 0.0 if theta is None else 1.0}
    return built({
        "vocab_size": hf["vocab_size"], "d_model": d_model, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads"), "head_dim": head_dim(hf),
        "mlp_hidden": read(hf, source, "intermediate_size"),
        "layer_pattern": shortest_period([KINDS[kind] for kind in _layer_types(hf, source)]),
        "mixers": {"linear": linear, "full": full}, "post_norm_layers": ["full"],
        "rope_theta": 10000.0 if theta is None else theta, "norm_eps": hf["rms_norm_eps"],
        "tie_embeddings": hf.get("tie_word_embeddings", False),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    if config.moe is not None or config.norm_unit_offset or config.rope_scaling is not None:
        raise CheckpointError("model: OLMo-hybrid has dense MLPs, plain RMSNorms and plain RoPE "
                              "(no moe, norm_unit_offset false, no rope_scaling)")
    require_plain(config, "OLMo-hybrid", allowed=("post_norm_layers",))
    layers = layer_mixers(config, {"gated_deltanet": "linear_attention", "attention": "full_attention"})
    kinds = config.layer_kinds()
    linear, full = same_options(layers, "gated_deltanet"), same_options(layers, "attention")
    for index, (name, options) in enumerate(layers):
        if (kinds[index] in config.post_norm_layers) != (name == "attention"):
            raise CheckpointError(f"model.layers.{index}: OLMo-hybrid's attention layers are post-norm and its "
                                  "linear layers pre-norm (post_norm_layers)")
        expected = ({"output_gate": True, "output_norm_eps": OUTPUT_NORM_EPS} if name == "gated_deltanet" else
                    default_options(AttentionConfig, "rotary_fraction", qk_norm="projection"))
        require_options(index, name, options, expected, "OLMo-hybrid")
    if full is not None and full.rotary_fraction not in (0.0, 1.0):
        raise CheckpointError(f"model.mixers: OLMo-hybrid rotates all of each head or nothing, not "
                              f"rotary_fraction {full.rotary_fraction}")
    key_heads = (linear and linear.num_heads) or config.n_heads
    key_dim = (linear and linear.head_dim) or config.dim_per_head
    return {
        "architectures": ["OlmoHybridForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "intermediate_size": config.mlp_width,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        **NO_SPECIAL_TOKENS,
        "layer_types": ["linear_attention" if name == "gated_deltanet" else "full_attention" for name, _ in layers],
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": None if full is None or full.rotary_fraction == 0 else config.rope_theta},
        "linear_num_key_heads": key_heads, "linear_key_head_dim": key_dim,
        "linear_num_value_heads": (linear and linear.num_v_heads) or key_heads,
        "linear_value_head_dim": int(round((linear.expand_v if linear else 2.0) * key_dim)),
        "linear_conv_kernel_dim": linear.conv_width if linear else 4,
        "linear_allow_neg_eigval": bool(linear and linear.negative_eigenvalues),
    }


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = []
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        if spec.name != "gated_deltanet":
            found.append(renamed(f"{layer}.feedforward_layer_norm.weight", f"{layer}.post_attention_layernorm.weight"))
            continue
        hub, ours = f"{layer}.linear_attn", f"{layer}.self_attn"
        key_heads, key_dim = options.num_heads or config.n_heads, options.head_dim or config.dim_per_head
        widths = [key_heads * key_dim] * 2 + [(options.num_v_heads or key_heads) * int(round(options.expand_v * key_dim))]
        found += [renamed(f"{layer}.attention_layer_norm.weight", f"{layer}.input_layernorm.weight"),
                  renamed(f"{layer}.feedforward_layer_norm.weight", f"{layer}.post_attention_layernorm.weight"),
                  split([f"{hub}.{name}_conv1d.weight" for name in "qkv"],
                        [f"{ours}.{name}_conv.weight" for name in "qkv"], widths, hub_sizes=widths, conv=True),
                  *(renamed(f"{hub}.{name}", f"{ours}.{name}") for name in (
                      "q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
                      "g_proj.weight", "o_proj.weight", "o_norm.weight", "A_log", "dt_bias"))]
    return found


FAMILY = Family(("olmo_hybrid",), config_from_hf, hf_config, conversions)
