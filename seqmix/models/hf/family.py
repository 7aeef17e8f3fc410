"""What an importer of one Hugging Face architecture provides (`Family`), and the config reading
and checking its families share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from seqmix.configuration import ConfigError, build
from seqmix.models.config import ModelConfig
from seqmix.models.hf.tensors import CheckpointError, Conversion

_REQUIRED = object()
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# Special token ids are the tokenizer's business, which seqmix's model config does not hold; written
# as null because some families' defaults (Kimi's 163839, OLMo's 100277) lie outside a small vocabulary.
NO_SPECIAL_TOKENS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture (or several that differ only in their config).

    config_from_hf(hf, source): the ModelConfig of a parsed `config.json` (source names the file
    in errors). hf_config(config, model_type): the `config.json` of a ModelConfig, as
    `model_type` (one of model_types), raising CheckpointError (naming the layer and option) when
    the family cannot express the model. conversions(config, hf): the tensors laid out otherwise
    than seqmix's (see `tensors`). ignored: prefixes of hub tensors that are not the language
    model's (vision towers, multi-token prediction heads). prefix: what the hub writes for
    seqmix's `model.` (a vision-language checkpoint's `model.language_model.`, Mamba2's
    `backbone.`), on import and export. old_names: (old, new) prefixes of hub tensor names, the
    names of older checkpoints read as the new ones (Mamba2's `backbone.embedding.`).
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
    hf_config: Callable[[ModelConfig, str], dict[str, Any]] | None
    conversions: Callable[[ModelConfig, dict[str, Any]], list[Conversion]] = lambda config, hf: []
    ignored: tuple[str, ...] = ()
    prefix: str = "model."
    old_names: tuple[tuple[str, str], ...] = ()


def read(hf: dict[str, Any], source: str, *keys: str, default: Any = _REQUIRED) -> Any:
    """The value of the first of `keys` (a key and its aliases) that `hf` has, else `default`;
    a CheckpointError naming the key when there is no default."""
    for key in keys:
        if key in hf:
            return hf[key]
    if default is _REQUIRED:
        raise CheckpointError(f"{source}: key {keys[0]} is missing")
    return default


def require_values(hf: dict[str, Any], source: str, supported: dict[str, Any]) -> None:
    """Refuses a config whose keys hold other values than the only ones seqmix supports (a key
    that is absent takes the supported value)."""
    for key, value in supported.items():
        if hf.get(key, value) != value:
            raise CheckpointError(f"{source}: {key} = {hf[key]!r} is not supported (only {value!r})")


def json_float(value: Any, source: str, key: str) -> float:
    """A float of a config.json: a number, or transformers' form of those JSON cannot write
    (`{"__float__": "Infinity"}`, "-Infinity", "NaN")."""
    if isinstance(value, dict) and set(value) == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value["__float__"]]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise CheckpointError(f"{source}: {key} holds {value!r}, not a number")


def float_json(value: float) -> Any:
    """A float as transformers writes it into a config.json (infinities as `{"__float__": "Infinity"}`)."""
    return {"__float__": "Infinity" if value > 0 else "-Infinity"} if math.isinf(value) else value


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of a config in the transformers 5 form (`rope_parameters`) or the older
    one (`rope_theta`, `rope_scaling`, `partial_rotary_factor` at the top level), as one mapping."""
    parameters = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in parameters and key in hf:
            parameters[key] = hf[key]
    return parameters


def head_dim(hf: dict[str, Any]) -> int | None:
    """ModelConfig.head_dim of a config: its head_dim where that differs from hidden / heads."""
    value = hf.get("head_dim")
    return value if value != hf["hidden_size"] // hf["num_attention_heads"] else None


def shortest_period(kinds: list[str]) -> list[str]:
    """The shortest prefix of `kinds` whose repetition gives `kinds` (a layer_pattern)."""
    for length in range(1, len(kinds) + 1):
        if len(kinds) % length == 0 and kinds == kinds[:length] * (len(kinds) // length):
            return kinds[:length]
    return kinds


def built(options: dict[str, Any], source: str) -> ModelConfig:
    """The validated ModelConfig of `options`; an invalid one is the checkpoint's fault."""
    try:
        return build(ModelConfig, options, source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def layer_mixers(config: ModelConfig, expected: dict[str, str]) -> list[tuple[str, Any]]:
    """(mixer name, options) of every layer, refusing a layer whose mixer is not a key of
    `expected` (mixer name -> what the family calls such layers)."""
    layers = []
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        if spec.name not in expected:
            raise CheckpointError(f"model.layers.{index}: a {spec.name!r} layer has no place in this format "
                                  f"(its layers are {', '.join(f'{name} ({role})' for name, role in expected.items())})")
        layers.append((spec.name, options))
    return layers


def require_options(index: int, mixer: str, options: Any, expected: dict[str, Any], family: str) -> None:
    """Refuses a layer whose mixer options differ from what `family` can hold."""
    for key, value in expected.items():
        if getattr(options, key) != value:
            raise CheckpointError(f"model.layers.{index}: {mixer} with {key} = {getattr(options, key)!r} has no "
                                  f"{family} equivalent (it needs {value!r})")


# What a mixture of experts of the SwiGLU families (Qwen3-Next, Kimi Linear, MiniMax) must have.
SWIGLU_EXPERTS = {"activation": "silu", "gated": True, "latent_size": None}


def require_moe(moe: Any, expected: dict[str, Any], family: str) -> None:
    """Refuses a mixture of experts (`MoEConfig`) whose options differ from `expected` and, unless
    `expected` says otherwise, from SwiGLU experts in the model's width, naming the option."""
    for key, value in {**SWIGLU_EXPERTS, **expected}.items():
        if getattr(moe, key) != value:
            raise CheckpointError(f"model.moe.{key}: {getattr(moe, key)!r} has no {family} equivalent "
                                  f"(it needs {value!r})")


def default_options(options_class: type, *mapped: str, **values: Any) -> dict[str, Any]:
    """What `require_options` expects of the mixer options a family has no config key for: every
    field of `options_class` but those `mapped` to keys, at its default (or as in `values`). A
    field a mixer gains later is then refused until the family learns to write it."""
    default = options_class(**values)
    return {field.name: getattr(default, field.name) for field in dataclasses.fields(options_class)
            if field.name not in mapped}


def same_options(layers: list[tuple[str, Any]], mixer: str) -> Any:
    """The options that every `mixer` layer shares (a config.json holds one set per kind); None
    when there is no such layer."""
    found = [(index, options) for index, (name, options) in enumerate(layers) if name == mixer]
    for index, options in found[1:]:
        if options != found[0][1]:
            raise CheckpointError(f"model.layers.{index}: its {mixer} options differ from layer {found[0][0]}'s "
                                  "(a config.json holds one set per kind of layer)")
    return found[0][1] if found else None


# ModelConfig's options of a model's form beside its layers' mixers: a family that has no place
# for one refuses a model that sets it (`require_plain`).
FORM_OPTIONS = ("moe", "norm_unit_offset", "post_norm_layers", "residual_scales", "rope_scaling", "mlp_activation",
                "mlp_bias", "mlp_multipliers", "embedding_multiplier", "logit_multiplier", "logit_soft_cap", "learned_initial_state")


def require_plain(config: ModelConfig, family: str, *, allowed: tuple[str, ...] = ()) -> None:
    """Refuses a model that sets one of FORM_OPTIONS, other than those `allowed`, to anything but
    ModelConfig's default, naming the option (`family` has no place for it)."""
    fields = {field.name: field for field in dataclasses.fields(ModelConfig)}
    as_compared = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # lists read from YAML
    for key in FORM_OPTIONS:
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        value = getattr(config, key)
        if key not in allowed and as_compared(value) != as_compared(default):
            raise CheckpointError(f"model.{key}: {value!r} has no {family} equivalent (it needs {default!r})")
