"""Hugging Face checkpoints in and out: Llama, Mistral and Qwen2 `config.json` + safetensors (one
file, or shards listed by `model.safetensors.index.json`) into a seqmix `LanguageModel`, and a
seqmix attention model back to that format.

The parameter names already follow Llama's (`layers.N.self_attn.q_proj`, ...): a seqmix kernel
[in, out] is the transpose of the torch `weight` [out, in] of the same name under `model.`
(`lm_head.weight` at the top). Only local directories are read. Every tensor the config implies
must be present with its shape, and nothing else may be: a mismatch names the tensor and file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.layers.transfer import TransferParam
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_TYPES = ("llama", "mistral", "qwen2")
# Buffers some exporters store that carry no parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The parameters of a model that a checkpoint holds: not LoRA adapters, nor what a conversion adds.
CHECKPOINT_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.LoRAParam, TransferParam)))


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that does not match its config or what seqmix can load."""


def _rope(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling of a config in the transformers 5 form (`rope_parameters`) or
    the older one (`rope_theta`, `rope_scaling`)."""
    parameters = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = parameters.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = parameters.pop("rope_type", parameters.pop("type", "default"))
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


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The seqmix ModelConfig of a Llama, Mistral or Qwen2 `config.json` (a parsed mapping)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, supported) != supported:
            raise CheckpointError(f"{source}: {key} = {hf[key]!r} is not supported (only {supported!r})")
    layers, head_dim = hf["num_hidden_layers"], hf.get("head_dim")
    windows = _layer_windows(hf, layers)
    attention = {"type": "attention", "qkv_bias": model_type == "qwen2"}
    kinds = {window: ("attention" if window is None else f"window_{window}") for window in set(windows)}
    mixers = {kinds[window]: {**attention, "sliding_window": window} for window in set(windows)}
    pattern = [kinds[window] for window in windows]
    options = {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": layers,
        "n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
        "head_dim": head_dim if head_dim != hf["hidden_size"] // hf["num_attention_heads"] else None,
        "mlp_hidden": hf["intermediate_size"],
        "layer_pattern": pattern if len(mixers) > 1 else pattern[:1], "mixers": mixers,
        "norm_eps": hf["rms_norm_eps"], "tie_embeddings": hf.get("tie_word_embeddings", False),
        **_rope(hf, source),
    }
    try:
        return build(ModelConfig, options, source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` mapping of a seqmix model made only of attention layers: Qwen2 when its
    q/k/v projections have biases, Mistral when every layer has the same sliding window, Llama
    otherwise (Qwen2 with per-layer `layer_types` where windows vary; `save_pretrained` then
    writes zero biases if the model has none)."""
    layer_options = []
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        if spec.name != "attention":
            raise CheckpointError(f"model.layers.{index}: a {spec.name!r} layer has no Hugging Face equivalent "
                                  "(only attention models are exported)")
        unexported = [name for name, on in (("qk_norm", options.qk_norm), ("output_gate", options.output_gate),
                                            ("rotary_fraction", options.rotary_fraction != 1.0)) if on]
        if unexported:
            raise CheckpointError(f"model.layers.{index}: attention with {', '.join(unexported)} has no Llama, "
                                  "Mistral or Qwen2 equivalent")
        layer_options.append(options)
    for key, on in (("moe", config.moe is not None), ("norm_unit_offset", config.norm_unit_offset),
                    ("post_norm_layers", bool(config.post_norm_layers))):
        if on:
            raise CheckpointError(f"model.{key}: has no Llama, Mistral or Qwen2 equivalent (not exported)")
    biases = {options.qkv_bias for options in layer_options}
    windows = [options.sliding_window for options in layer_options]
    if len(biases) > 1:
        raise CheckpointError("model.mixers: q/k/v biases in some attention layers only cannot be exported")
    qwen2 = biases == {True}
    if qwen2 or len(set(windows)) > 1:
        model_type, layout = "qwen2", {
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
            "use_sliding_window": any(w is not None for w in windows),
            "sliding_window": next((w for w in windows if w is not None), None), "max_window_layers": 0}
        if len({w for w in windows if w is not None}) > 1:
            raise CheckpointError(f"model.mixers: sliding windows of different sizes {sorted(set(windows) - {None})} "
                                  "cannot be exported")
    elif windows[0] is not None:
        model_type, layout = "mistral", {"sliding_window": windows[0]}
    else:
        model_type, layout = "llama", {"attention_bias": False, "mlp_bias": False}
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **to_dict(config.rope_scaling)}
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {
        "architectures": [architecture[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head, "intermediate_size": config.mlp_width, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope, "torch_dtype": "float32", **layout,
    }


def _hf_name(path: tuple) -> tuple[str, bool]:
    """(Hugging Face tensor name, whether it is stored transposed) of a seqmix parameter path."""
    *module, leaf = (str(part) for part in path if part != "base")  # LoRALinear's wrapped projection
    name = ".".join(module) + (".bias" if leaf == "bias" else ".weight")
    return (name if module[0] == "lm_head" else f"model.{name}"), leaf == "kernel"


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Each tensor's file, from the shard index or the single safetensors file."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from err
        missing = sorted({file for file in weight_map.values() if not (directory / file).exists()})
        if missing:
            raise CheckpointError(f"{index}: lists shard {missing[0]}, which is not in {directory}")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="flax") as handle:
        return {name: single for name in handle.keys()}


def read_weights(path: str | os.PathLike, params: nnx.State, *, tie_embeddings: bool, dtype=jnp.float32
                 ) -> nnx.State:
    """`params` (a model's `nnx.Param` state, abstract or not) with every value read from the
    Hugging Face checkpoint directory `path`, as `dtype`. Parameters are matched by name (a
    LoRA-wrapped projection's `base` by the projection's name; LoRA adapters are left out), so a
    converted model whose layers keep attention's projections reads its teacher's checkpoint."""
    directory = Path(path)
    files = _tensor_files(directory)
    wanted = {_hf_name(path): (path, variable) for path, variable in nnx.to_flat_state(params)
              if not isinstance(variable, nnx.LoRAParam)}
    names = {name for name, _ in wanted}
    extra = sorted(name for name in files if name not in names and not name.endswith(_IGNORED_SUFFIXES)
                   and not (tie_embeddings and name == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: tensor {extra[0]} has no place in the model "
                              f"({len(extra)} unexpected, e.g. {', '.join(extra[:3])})")
    missing = sorted(name for name, _ in wanted if name not in files)
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]} is missing (the model has this parameter)")
    handles = {file: safe_open(file, framework="flax") for file in {files[name] for name, _ in wanted}}
    loaded = []
    for (name, transposed), (param_path, variable) in sorted(wanted.items()):
        tensor = handles[files[name]].get_tensor(name)
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise CheckpointError(f"{files[name]}: tensor {name} is {tensor.dtype}, not a float type")
        expected = variable.shape[::-1] if transposed else variable.shape
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{files[name]}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected)}")
        loaded.append((param_path, variable.replace(value=(tensor.T if transposed else tensor).astype(dtype))))
    return nnx.from_flat_state(loaded)


def _abstract_model(directory: Path) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(config, graph, abstract parameters) of the attention model a checkpoint's config.json describes."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no config.json")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    return config, graphdef, params


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> LanguageModel:
    """A seqmix LanguageModel with the weights of a local Hugging Face checkpoint directory
    (Llama, Mistral, Qwen2), parameters in `dtype`; `model(tokens)` gives [B, T, vocab] logits."""
    config, graphdef, params = _abstract_model(Path(path))
    return nnx.merge(graphdef, read_weights(path, params, tie_embeddings=config.tie_embeddings, dtype=dtype))


def teacher_of(student: LanguageModel, path: str | os.PathLike) -> LanguageModel:
    """The attention model of checkpoint directory `path` built on `student`'s own arrays: each of
    its parameters is the student's of the same checkpoint name (a LoRA-wrapped projection's base;
    adapters and a conversion's new parameters are not teacher weights). For a conversion
    initialised from `path` whose base weights have not trained yet, this is `from_pretrained(path)`
    without reading the tensors again or holding a second copy of them."""
    _, graphdef, params = _abstract_model(Path(path))
    taught = nnx.to_flat_state(nnx.state(student, CHECKPOINT_PARAMS))
    arrays = {_hf_name(param_path)[0]: variable.get_value() for param_path, variable in taught}
    shared = []
    for param_path, variable in nnx.to_flat_state(params):
        name = _hf_name(param_path)[0]
        array = arrays.get(name)
        if array is None or array.shape != variable.shape:
            found = "absent" if array is None else f"of shape {array.shape}"
            raise CheckpointError(f"{path}: tensor {name} {variable.shape} of the teacher is {found} in the student")
        shared.append((param_path, variable.replace(value=array)))
    return nnx.merge(graphdef, nnx.from_flat_state(shared))


def save_pretrained(model: LanguageModel, config: ModelConfig, path: str | os.PathLike, dtype=jnp.float32) -> None:
    """Writes `config.json` and `model.safetensors` (tensors in `dtype`) of an attention-only
    seqmix model to directory `path`, in the Hugging Face layout `from_pretrained` reads. Each file
    is written to a temporary name and renamed into place, so an interrupted export never leaves
    a half-written file under the final name."""
    hf = hf_config(config)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(param_path)
        value = jnp.asarray(variable.get_value()).astype(dtype)
        tensors[name] = np.asarray(jax.device_get(value.T if transposed else value))
    if hf["model_type"] == "qwen2":  # Qwen2 always has q/k/v biases: a bias-free model exports zeros
        for name in [name for name in tensors if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            bias = name.removesuffix("weight") + "bias"
            tensors.setdefault(bias, np.zeros(tensors[name].shape[:1], tensors[name].dtype))
    hf["torch_dtype"] = str(jnp.dtype(dtype))

    def write(file_name: str, writer) -> None:
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{file_name}.")
        os.close(handle)
        try:
            writer(temporary)
            os.replace(temporary, directory / file_name)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    write(SINGLE_FILE, lambda file: save_file(tensors, file, metadata={"format": "pt"}))
    write("config.json", lambda file: Path(file).write_text(json.dumps(hf, indent=2) + "\n"))
