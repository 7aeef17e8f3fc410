"""seqmix's own pretrained format, for the models a Hugging Face config cannot describe:
linearized students (Liger, LoLCATs, any recurrent student), state-tuned models, any layer
pattern of registered mixers.

A directory in this format holds
- `config.json`: {"model_type": "seqmix", "format_version": 1, "model": {...}}, where "model" is
  the model's `ModelConfig` as plain data (what a run's config.yaml records under `model:`);
- `model.safetensors`: every parameter of the model under its path in the model, parts joined by
  dots (`layers.0.self_attn.q_proj.kernel`, `embed_tokens.embedding`), in seqmix's layout
  (projection kernels [in, out]), in the dtype it was saved in: learned feature maps (LoLCATs'
  Hedgehog maps) and learned initial states included, LoRA adapters never (merge them first,
  `seqmix.models.lora.merge_lora`).
`seqmix.from_pretrained(directory)` reads it back (config.json's model_type tells the formats
apart); `seqmix export RUN DIR` writes it for a run that the Hugging Face format cannot hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.flax import save_file

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.files import write_atomically
from seqmix.models.hf.files import SafetensorsFile
from seqmix.models.config import ModelConfig
from seqmix.models.hf.tensors import CheckpointError
from seqmix.models.lm import LanguageModel

MODEL_TYPE = "seqmix"
FORMAT_VERSION = 1
TENSOR_FILE = "model.safetensors"


def tensor_name(path: tuple) -> str:
    """A parameter's name in the format: its path in the model, parts joined by dots."""
    return ".".join(str(part) for part in path)


def require_described(model: LanguageModel, config: ModelConfig) -> None:
    """Refuses (CheckpointError) a model with unmerged LoRA adapters, or one that `config` does not
    describe: another module at some path (a linearized layer under its teacher's config) or a
    parameter of another shape. Saving under a config is only sound when loading it rebuilds this
    model."""
    adapted = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    if adapted:
        raise CheckpointError(f"the model has LoRA adapters ({tensor_name(adapted[0][0])}, ...): merge them into "
                              "their projections first (seqmix.models.lora.merge_lora)")
    expected = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    modules = lambda m: [(tensor_name(path) or "the model", type(module).__name__) for path, module in nnx.iter_modules(m)]
    for (path, kind), (expected_path, expected_kind) in zip(modules(model), modules(expected)):
        if (path, kind) != (expected_path, expected_kind):
            raise CheckpointError(f"the model is not the one its config describes: {path} is a {kind}, where the "
                                  f"config builds {expected_path}, a {expected_kind}")
    shapes = lambda m: {tensor_name(path): variable.shape for path, variable in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    ours, theirs = shapes(model), shapes(expected)
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            raise CheckpointError(f"the model is not the one its config describes: parameter {name} is "
                                  f"{ours.get(name, 'absent')} in the model, {theirs.get(name, 'absent')} by the config")


def save_seqmix(model: LanguageModel, config: ModelConfig, path: str | Path, dtype=jnp.float32) -> None:
    """Writes `config.json` and `model.safetensors` (parameters in `dtype`) of `model`, which
    `config` describes (see `require_described`), to directory `path`, each file atomically."""
    require_described(model, config)
    tensors = {tensor_name(param_path): jnp.asarray(jax.device_get(variable.get_value()), dtype)
               for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    document = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "model": to_dict(config)}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory, TENSOR_FILE, lambda file: save_file(tensors, file, metadata={"format": MODEL_TYPE}))
    write_atomically(directory, "config.json", lambda file: Path(file).write_text(json.dumps(document, indent=2) + "\n"))


def described_config(directory: Path, document: dict[str, Any]) -> ModelConfig:
    """The ModelConfig that `document`, the config.json of `directory` in this format, describes."""
    config_file = directory / "config.json"
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format_version {document.get('format_version')!r}; this seqmix reads "
                              f"format_version {FORMAT_VERSION}")
    if not isinstance(document.get("model"), dict):
        raise CheckpointError(f"{config_file}: \"model\" must be the model's config, a JSON object")
    try:
        return build(ModelConfig, document["model"], "model")
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: {err}") from err


def load_seqmix(directory: Path, document: dict[str, Any], dtype=jnp.float32) -> LanguageModel:
    """The model of a directory in this format whose config.json is `document`, parameters in
    `dtype`. A config or tensor that does not fit names the file and the key or tensor."""
    config, tensor_file = described_config(directory, document), directory / TENSOR_FILE
    if not tensor_file.exists():
        raise CheckpointError(f"{directory}: no {TENSOR_FILE}")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    wanted = {tensor_name(param_path): (param_path, variable) for param_path, variable in nnx.to_flat_state(params)}
    handle = SafetensorsFile(tensor_file)
    stored = set(handle.keys())
    for name in sorted(set(wanted) - stored):
        raise CheckpointError(f"{tensor_file}: tensor {name} {wanted[name][1].shape} is missing")
    for name in sorted(stored - set(wanted)):
        raise CheckpointError(f"{tensor_file}: tensor {name} has no place in the model config.json describes")
    loaded = []
    for name, (param_path, variable) in wanted.items():
        tensor = handle.get_tensor(name)
        if tensor.shape != variable.shape or not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise CheckpointError(f"{tensor_file}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected a float tensor of shape {variable.shape}")
        loaded.append((param_path, variable.replace(value=jnp.asarray(tensor, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
