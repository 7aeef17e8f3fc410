"""Hugging Face checkpoints in and out: a local directory's `config.json` + safetensors (one
file, or shards listed by `model.safetensors.index.json`) into a seqmix `LanguageModel`, and a
seqmix model back to that layout, which transformers reloads.

The architecture comes from config.json's `model_type` (`FAMILIES`). Tensors and parameters
correspond by torch name, through the family's conversions where the layouts differ (`tensors`).
Every tensor the model needs must be present with its shape, and nothing else may be, save a
family's ignored prefixes (vision towers, multi-token prediction heads), rotary buffers, and
`lm_head.weight` beside tied embeddings: a mismatch names the tensor and file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from seqmix.files import write_atomically
from seqmix.layers.transfer import TransferParam
from seqmix.mixers.state_tuning import InitialState
from seqmix.models.config import ModelConfig
from seqmix.models.hf import (falcon_h1, gemma, kimi_linear, lfm2, llama, mamba2, minimax, nemotron_h, olmo_hybrid,
                              qwen3, qwen3_next, recurrent_gemma, seqmix_format)
from seqmix.models.hf.family import Family
from seqmix.models.hf.files import SafetensorsFile, read_config
from seqmix.models.hf.tensors import CheckpointError, Conversion, torch_name
from seqmix.models.lm import LanguageModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FAMILIES = {model_type: family for family in (llama.FAMILY, qwen3.FAMILY, gemma.FAMILY, qwen3_next.TEXT,
                                              qwen3_next.VISION_LANGUAGE, olmo_hybrid.FAMILY, kimi_linear.FAMILY,
                                              lfm2.FAMILY, minimax.FAMILY, recurrent_gemma.FAMILY, mamba2.FAMILY,
                                              nemotron_h.FAMILY, falcon_h1.FAMILY)
            for model_type in family.model_types}
# Buffers some exporters store that carry no parameters (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The parameters of a model that a checkpoint holds: not LoRA adapters, nor what a conversion adds,
# nor the initial states that state tuning learns.
CHECKPOINT_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.LoRAParam, TransferParam, InitialState)))


def _family(hf: dict[str, Any], source: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The seqmix ModelConfig of a Hugging Face `config.json` (a parsed mapping) of any supported
    model_type."""
    family = _family(hf, source)
    try:
        return family.config_from_hf(hf, source)
    except CheckpointError:
        raise
    except KeyError as err:  # a family reading a key every config of its model_type has
        raise CheckpointError(f"{source}: required key {err.args[0]!r} is missing") from None
    except (TypeError, AttributeError, ValueError) as err:  # a value of another JSON type than the family reads
        raise CheckpointError(f"{source}: a value has the wrong type ({err})") from None


def hf_config(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The `config.json` mapping of a seqmix model as `model_type`; None: Llama, Mistral or Qwen2
    for a model made only of plain attention layers, else the first family that can express it
    (qwen3, gemma, qwen3_5_text, qwen3_next, olmo_hybrid, kimi_linear, lfm2, minimax, recurrent_gemma,
    mamba2, nemotron_h, falcon_h1). A model that the format cannot hold raises CheckpointError naming the
    layer and option."""
    if model_type is not None:
        family = _family({"model_type": model_type}, "model_type")
        if family.hf_config is None:
            raise CheckpointError(f"model_type {model_type!r}: seqmix exports its language model as qwen3_5_text")
        return family.hf_config(config, model_type)
    refusals = []
    for candidate in (None, "qwen3", "gemma", "qwen3_5_text", "qwen3_next", "olmo_hybrid", "kimi_linear", "lfm2",
                      "minimax", "recurrent_gemma", "mamba2", "nemotron_h", "falcon_h1"):
        try:
            return llama.hf_config(config) if candidate is None else hf_config(config, candidate)
        except CheckpointError as err:
            refusals.append(f"{candidate or 'llama/mistral/qwen2'}: {err}")
    raise CheckpointError("the model has no Hugging Face format seqmix exports:\n  " + "\n  ".join(refusals))


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
    return {name: single for name in SafetensorsFile(single).keys()}


def _identity(name: str) -> Conversion:
    return Conversion((name,), (name,), lambda arrays: arrays, lambda arrays: arrays)


def _plan(family: Family, config: ModelConfig, hf: dict[str, Any], ours: set[str]) -> list[Conversion]:
    """The conversions that give every torch name in `ours`: the family's, then identities."""
    conversions = [conversion for conversion in family.conversions(config, hf) if set(conversion.ours) <= ours]
    converted = {name for conversion in conversions for name in conversion.ours}
    return conversions + [_identity(name) for name in sorted(ours - converted)]


def read_weights(path: str | os.PathLike, params: nnx.State, config: ModelConfig, dtype=jnp.float32) -> nnx.State:
    """`params` (the `nnx.Param` state of a model of `config`, abstract or not) with every value
    read from the Hugging Face checkpoint directory `path`, as `dtype`. Parameters are matched by
    torch name (a LoRA-wrapped projection's `base` by the projection's; LoRA adapters are left
    out), so a converted model whose layers keep attention's projections reads its teacher's
    checkpoint."""
    directory = Path(path)
    hf = read_config(directory)
    family = _family(hf, str(directory / "config.json"))
    files = {}
    for name, file in _tensor_files(directory).items():
        if name.startswith(family.ignored) or name.endswith(_IGNORED_SUFFIXES):
            continue
        current = next((new + name.removeprefix(old) for old, new in family.old_names if name.startswith(old)), name)
        if current.startswith(family.prefix):
            files["model." + current.removeprefix(family.prefix)] = (name, file)
        else:
            files[current] = (name, file)
    wanted = {torch_name(path)[0]: (path, variable, torch_name(path)[1]) for path, variable in
              nnx.to_flat_state(params) if not isinstance(variable, nnx.LoRAParam)}
    plan = _plan(family, config, hf, set(wanted))
    used = {name for conversion in plan for name in conversion.hub}
    extra = sorted(name for name in files if name not in used
                   and not (config.tie_embeddings and name == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{files[extra[0]][1]}: tensor {files[extra[0]][0]} has no place in the model "
                              f"({len(extra)} unexpected, e.g. {', '.join(files[name][0] for name in extra[:3])})")
    handles: dict[Path, Any] = {}
    loaded = []
    for conversion in plan:
        arrays = []
        for name in conversion.hub:
            if name not in files:
                needed = "" if conversion.ours == (name,) else f" (the model needs it for {', '.join(conversion.ours)})"
                raise CheckpointError(f"{directory}: tensor {name.replace('model.', family.prefix, 1)} is missing"
                                      f"{needed}")
            stored, file = files[name]
            if file not in handles:
                handles[file] = SafetensorsFile(file)
            handle = handles[file]
            tensor = np.asarray(handle.get_tensor(stored))
            if not jnp.issubdtype(tensor.dtype, jnp.floating):
                raise CheckpointError(f"{file}: tensor {stored} is {tensor.dtype}, not a float type")
            arrays.append(tensor.astype(np.float32))
        source = f"{files[conversion.hub[0]][1]}: " if conversion.hub else ""
        try:
            converted = conversion.to_ours(arrays)
        except CheckpointError as err:
            raise CheckpointError(f"{source}{err}") from err
        for name, array in zip(conversion.ours, converted):
            param_path, variable, transposed = wanted[name]
            expected = variable.shape[::-1] if transposed else variable.shape
            if tuple(array.shape) != tuple(expected):
                held = " + ".join(files[hub][0] for hub in conversion.hub)
                gives = "has" if conversion.hub == (name,) else f"gives {name} of"
                raise CheckpointError(f"{source}tensor {held} {gives} shape {tuple(array.shape)}, "
                                      f"expected {tuple(expected)}")
            loaded.append((param_path, variable.replace(value=jnp.asarray(array.T if transposed else array, dtype))))
    return nnx.from_flat_state(loaded)


def _abstract_model(directory: Path) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """(config, graph, abstract parameters) of the model a checkpoint's config.json describes."""
    config = config_from_hf(read_config(directory), str(directory / "config.json"))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    return config, graphdef, params


def pretrained_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the model in checkpoint directory `path` (either format), tensors unread."""
    directory = Path(path)
    document = read_config(directory)
    if document.get("model_type") == seqmix_format.MODEL_TYPE:
        return seqmix_format.described_config(directory, document)
    return config_from_hf(document, str(directory / "config.json"))


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> LanguageModel:
    """A seqmix LanguageModel with the weights of a local checkpoint directory, a Hugging Face one
    (any model_type of `FAMILIES`) or one in seqmix's own format (`seqmix_format`), parameters
    in `dtype`; `model(tokens)` gives [B, T, vocab] logits."""
    directory = Path(path)
    document = read_config(directory)
    if document.get("model_type") == seqmix_format.MODEL_TYPE:
        return seqmix_format.load_seqmix(directory, document, dtype)
    config, graphdef, params = _abstract_model(directory)
    return nnx.merge(graphdef, read_weights(path, params, config, dtype=dtype))


def save_pretrained(model: LanguageModel, config: ModelConfig, path: str | os.PathLike, dtype=jnp.float32,
                    model_type: str | None = None) -> None:
    """Writes `config.json` and `model.safetensors` (tensors in `dtype`) of a seqmix model to
    directory `path`, in the hub layout of `model_type` (None: see `hf_config`), which
    `from_pretrained` and transformers read. Each file is written to a temporary name and renamed
    into place, so an interrupted export never leaves a half-written file under the final name.
    `config` must describe `model` (`seqmix_format.require_described`: no LoRA adapters left
    unmerged, no linearized layer saved under its teacher's config)."""
    hf = hf_config(config, model_type)
    seqmix_format.require_described(model, config)
    family = FAMILIES[hf["model_type"]]
    ours = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = torch_name(param_path)
        value = np.asarray(jax.device_get(variable.get_value()), np.float32)
        ours[name] = value.T if transposed else value
    tensors = {}
    for conversion in _plan(family, config, hf, set(ours)):
        for name, array in zip(conversion.hub, conversion.to_hub([ours[name] for name in conversion.ours])):
            hub_name = family.prefix + name.removeprefix("model.") if name.startswith("model.") else name
            tensors[hub_name] = np.ascontiguousarray(jax.device_get(jnp.asarray(array).astype(dtype)))
    hf["torch_dtype"] = str(jnp.dtype(dtype))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory, SINGLE_FILE, lambda file: save_file(tensors, file, metadata={"format": "pt"}))
    write_atomically(directory, "config.json", lambda file: Path(file).write_text(json.dumps(hf, indent=2) + "\n"))


def export_pretrained(model: LanguageModel, config: ModelConfig, path: str | os.PathLike, *, form: str = "auto",
                      dtype=jnp.float32) -> str:
    """Writes `model` (described by `config`, LoRA merged) to directory `path`: form "hf" in the
    Hugging Face layout (`save_pretrained`), "seqmix" in seqmix's own format, "auto" the Hugging
    Face layout when `hf_config` can express the model, else seqmix's. Returns what was written:
    "hf (<model_type>)" or "seqmix (...)"."""
    if form not in ("auto", "hf", "seqmix"):
        raise ValueError(f"form must be auto, hf or seqmix, got {form!r}")
    if form != "seqmix":
        try:
            model_type = hf_config(config)["model_type"]
        except CheckpointError:
            if form == "hf":
                raise
            seqmix_format.save_seqmix(model, config, path, dtype)
            return "seqmix (no Hugging Face model_type holds this model; --format hf says why)"
        save_pretrained(model, config, path, dtype, model_type)
        return f"hf ({model_type})"
    seqmix_format.save_seqmix(model, config, path, dtype)
    return "seqmix"
