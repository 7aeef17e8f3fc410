"""MiniMax-01 (`minimax`): lightning attention layers (seqmix's `lightning`, MiniMax's own formula)
among softmax attention layers, a mixture of experts in every layer (softmax top-k, renormalised,
SwiGLU experts, no shared expert), and blocks that take their residuals after the norms with an
alpha and a beta per kind of layer (ModelConfig.residual_scales):

    n = input_layernorm(h);  h = alpha_kind n + beta_kind mixer(n)
    n = post_attention_layernorm(h);  h = mlp_alpha n + mlp_beta MoE(n)

Config: `layer_types` ("linear_attention" / "full_attention"; absent: transformers' default, full
attention in the even layers); the factors full_attn_*, linear_attn_*, mlp_* alpha/beta; the
full layers' `sliding_window`; `block_size`, the length of the blocks MiniMax computes in (seqmix's
result does not depend on it). RoPE: transformers 5.24 rotates every dim of each head whatever the
config says; MiniMax-Text-01's own config has `rotary_dim` (64 of head_dim 128), which transformers
drops without a word (as it did for MiniMax-M2, transformers issue 48241). seqmix honours
`rotary_dim` and rope_parameters' partial_rotary_factor (as rotary_fraction), and exports a partial
rotation as `rotary_dim`.

Hub layout against seqmix: a lightning layer's `qkv_proj` holds per head [q_h | k_h | v_h]
(seqmix: q_proj, k_proj, v_proj), `output_gate` is g_proj, `norm` o_norm, `out_proj` o_proj; its
buffers slope_rate [H, 1, 1], query_decay and key_decay [H, n, 1], diagonal_decay [1, H, n, n]
(n = block_size) are what the config determines (`decay_tables`): import checks them (a
checkpoint whose tables disagree is not the model its config describes: an error names the
tensor), export writes them. The experts: `block_sparse_moe.gate` (router) and
`block_sparse_moe.experts.E.w1/w3/w2` (gate, up, down).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from seqmix.mixers.lightning import lightning_slopes
from seqmix.models.config import ModelConfig
from seqmix.models.hf.family import (NO_SPECIAL_TOKENS, Family, built, head_dim, layer_mixers, read, require_moe,
                                     require_options, require_plain, require_values, rope_parameters, same_options,
                                     shortest_period)
from seqmix.models.hf.tensors import CheckpointError, Conversion, renamed, split, stacked

DEFAULT_ROPE_THETA = 1000000.0  # MiniMaxConfig.default_theta
KINDS = {"linear_attention": "linear", "full_attention": "full"}
TABLES = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
# A bfloat16 checkpoint's tables hold 3 significant digits; a wrong formula or depth is off by far more.
TABLE_RTOL, TABLE_ATOL = 1e-2, 1e-6


def _layer_types(hf: dict[str, Any], source: str) -> list[str]:
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["full_attention" if i % 2 == 0 else "linear_attention" for i in range(layers)]
    if set(types) - set(KINDS) or len(types) != layers:
        raise CheckpointError(f"{source}: layer_types must list {layers} of {', '.join(KINDS)}, got {types}")
    return types


def _rotary_fraction(hf: dict[str, Any], rope: dict[str, Any], source: str) -> float:
    """The share of each head that RoPE rotates: rotary_dim / head_dim, or partial_rotary_factor."""
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    fractions = {key: value for key, value in (("rotary_dim", hf["rotary_dim"] / dim if "rotary_dim" in hf else None),
                                               ("partial_rotary_factor", rope.get("partial_rotary_factor")))
                 if value is not None}
    if len(set(fractions.values())) > 1:
        raise CheckpointError(f"{source}: rotary_dim = {hf['rotary_dim']} of head_dim {dim} disagrees with "
                              f"partial_rotary_factor = {rope['partial_rotary_factor']}")
    return next(iter(fractions.values()), 1.0)


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    require_values(hf, source, {"hidden_act": "silu"})
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    kinds = shortest_period([KINDS[kind] for kind in _layer_types(hf, source)])
    mlp = [hf.get("mlp_alpha_factor", 1), hf.get("mlp_beta_factor", 1)]
    scales = {"linear": [hf.get("linear_attn_alpha_factor", 1), hf.get("linear_attn_beta_factor", 1), *mlp],
              "full": [hf.get("full_attn_alpha_factor", 1), hf.get("full_attn_beta_factor", 1), *mlp]}
    width = read(hf, source, "intermediate_size")
    return built({
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"), "head_dim": head_dim(hf),
        "mlp_hidden": width, "layer_pattern": kinds,
        "mixers": {kind: options for kind, options in (
            ("linear", {"type": "lightning", "block_size": hf.get("block_size", 256)}),
            ("full", {"type": "attention", "sliding_window": hf.get("sliding_window"),
                      "rotary_fraction": _rotary_fraction(hf, rope, source)})) if kind in kinds},
        "residual_scales": {kind: [float(factor) for factor in scales[kind]] for kind in scales if kind in kinds},
        "moe": {"num_experts": read(hf, source, "num_local_experts", "num_experts"),
                "top_k": read(hf, source, "num_experts_per_tok"), "expert_hidden": width, "scoring": "softmax",
                "renormalize": True},
        "rope_theta": rope.get("rope_theta", DEFAULT_ROPE_THETA), "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
    }, source)


def hf_config(config: ModelConfig, model_type: str) -> dict[str, Any]:
    require_plain(config, "MiniMax", allowed=("moe", "residual_scales"))
    layers = layer_mixers(config, {"lightning": "linear_attention", "attention": "full_attention"})
    linear, full = same_options(layers, "lightning"), same_options(layers, "attention")
    for index, (name, options) in enumerate(layers):
        if name == "attention":
            require_options(index, name, options, {"qk_norm": None, "output_gate": False, "qkv_bias": False},
                            "MiniMax")
    factors = _residual_factors(config)
    rotary = {} if full is None or full.rotary_fraction == 1.0 else {
        "rotary_dim": int(config.dim_per_head * full.rotary_fraction) // 2 * 2}
    return {
        "architectures": ["MiniMaxForCausalLM"], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, **NO_SPECIAL_TOKENS,
        "layer_types": ["linear_attention" if name == "lightning" else "full_attention" for name, _ in layers],
        "block_size": linear.block_size if linear else 256, "sliding_window": full.sliding_window if full else None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, **rotary,
        **_experts(config), **factors,
    }


def _residual_factors(config: ModelConfig) -> dict[str, float]:
    """The alpha/beta factors of a config.json from ModelConfig.residual_scales, which must give
    every layer kind scales, one pair per kind of mixer and one pair for the MLPs."""
    found: dict[str, float] = {}
    for index, kind in enumerate(config.layer_kinds()):
        if kind not in config.residual_scales:
            raise CheckpointError(f"model.residual_scales: MiniMax takes every layer's residuals after its norms, "
                                  f"but layer {index} ({kind!r}) has no scales")
        prefix = "linear_attn" if config.mixer(kind)[0].name == "lightning" else "full_attn"
        scales = dict(zip((f"{prefix}_alpha_factor", f"{prefix}_beta_factor", "mlp_alpha_factor", "mlp_beta_factor"),
                          config.residual_scales[kind]))
        for key, value in scales.items():
            if found.setdefault(key, value) != value:
                raise CheckpointError(f"model.residual_scales.{kind}: {key} {value} differs from another layer's "
                                      f"{found[key]} (a MiniMax config.json holds one per kind of layer)")
    return found


def _experts(config: ModelConfig) -> dict[str, Any]:
    """The mixture-of-experts keys of a MiniMax config: experts in every layer, as MiniMax routes them."""
    moe = config.moe
    if moe is None or not all(moe.sparse(index) for index in range(config.n_layers)):
        raise CheckpointError("model.moe: MiniMax has a mixture of experts in every layer")
    expected = {"scoring": "softmax", "renormalize": True, "selection_bias": False, "expert_groups": 1,
                "routed_scale": 1.0, "shared_hidden": 0}
    require_moe(moe, expected, "MiniMax")
    return {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.expert_hidden or config.mlp_width}


def decay_tables(slopes: np.ndarray, block_size: int) -> list[np.ndarray]:
    """The buffers of a MiniMax lightning layer (in TABLES order, float32) from its slopes s [H]:
    slope_rate [H, 1, 1]; query_decay [H, n, 1] = exp(-s i) and key_decay [H, n, 1] = exp(-s (n - i))
    for i = 1..n (n = block_size); diagonal_decay [1, H, n, n] = exp(-s (i - j)) for i >= j, else 0."""
    rate = slopes.astype(np.float64)[:, None, None]
    index = np.arange(1, block_size + 1, dtype=np.float64)[:, None]
    gap = index - index.T
    diagonal = np.where(gap >= 0, np.exp(-rate * np.maximum(gap, 0)), 0.0)[None]
    return [table.astype(np.float32) for table in (rate, np.exp(-rate * index), np.exp(-rate * (block_size - index)),
                                                   diagonal)]


def _tables(hub: str, slopes: np.ndarray, block_size: int, where: str) -> Conversion:
    """The decay tables of a lightning layer: checked against `slopes` on import, written on export."""
    names = tuple(f"{hub}.{table}" for table in TABLES)
    expected = decay_tables(slopes, block_size)

    def to_ours(arrays):
        for name, array, table in zip(names, arrays, expected):
            if array.shape != table.shape:
                raise CheckpointError(f"tensor {name} has shape {array.shape}, expected {table.shape} ({where})")
            if not np.allclose(array, table, rtol=TABLE_RTOL, atol=TABLE_ATOL):
                raise CheckpointError(f"tensor {name} disagrees with the decays of {where} (by up to "
                                      f"{np.max(np.abs(array - table)):.3g}): it is not the model its config describes")
        return []

    return Conversion(names, (), to_ours, lambda arrays: expected)


def conversions(config: ModelConfig, hf: dict[str, Any]) -> list[Conversion]:
    found = []
    heads, dim = config.n_heads, config.dim_per_head
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        layer = f"model.layers.{index}"
        attn = f"{layer}.self_attn"  # the same name in both layouts
        if spec.name == "lightning":
            where = f"layer {index} of {config.n_layers} with {heads} heads, blocks of {options.block_size}"
            found += [split([f"{attn}.qkv_proj.weight"], [f"{attn}.{name}_proj.weight" for name in "qkv"], [dim] * 3,
                            groups=heads),
                      renamed(f"{attn}.output_gate.weight", f"{attn}.g_proj.weight"),
                      renamed(f"{attn}.norm.weight", f"{attn}.o_norm.weight"),
                      renamed(f"{attn}.out_proj.weight", f"{attn}.o_proj.weight"),
                      _tables(attn, lightning_slopes(heads, index, config.n_layers), options.block_size, where)]
        if config.moe is not None and config.moe.sparse(index):
            found.append(renamed(f"{layer}.block_sparse_moe.gate.weight", f"{layer}.mlp.router.weight"))
            found += [stacked(f"{layer}.block_sparse_moe.experts.{{}}.{hub}.weight", f"{layer}.mlp.{name}",
                              config.moe.num_experts)
                      for hub, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]
    return found


FAMILY = Family(("minimax",), config_from_hf, hf_config, conversions)
