"""Typed configuration: dataclasses built from YAML mappings with dotted overrides.

Every config in seqmix is a (possibly nested) dataclass. `build(cls, mapping)` checks each key
against the dataclass fields and each value against the field's type, so a misspelt key or a
wrong type fails at load time with the full dotted key in the message, long before anything is
compiled. Dataclasses may define `validate(self, path)` for value checks that involve several
fields (it is called after construction, children before parents).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Returns `value` checked (and, for safe widenings like int -> float, converted) as `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise ConfigError(f"{path}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(member, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        _key_tp, value_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(value_tp, v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponent floats without a dot (3e-4) as strings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def build(cls: type[T], mapping: dict[str, Any] | None, path: str = "") -> T:
    """Builds dataclass `cls` from a mapping, failing on unknown keys, wrong types, bad values."""
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        key = _join(path, unknown[0])
        # A key of a section one level down, given at this level (`lr=` for `optim.lr=`): name it.
        homes = [_join(path, f"{name}.{unknown[0]}") for name in sorted(fields)
                 if dataclasses.is_dataclass(hints[name]) and unknown[0] in {f.name for f in dataclasses.fields(hints[name])}]
        hint = f"did you mean {' or '.join(homes)}? " if homes else ""
        raise ConfigError(f"{key}: unknown key ({hint}valid keys of {path or 'the config'}: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in mapping.items()}
    for name, field in fields.items():
        if name not in kwargs and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config (what `build` accepts back)."""
    return dataclasses.asdict(config)


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first difference of two plain-data configs
    (`to_dict` forms), keys under `path`; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(key for key in b if key not in a)]:
            found = first_difference(a.get(key), b.get(key), _join(path, key))
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


def require(condition: bool, path: str, key: str, message: str) -> None:
    """Raises a ConfigError naming `path.key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{_join(path, key)}: {message}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits `a.b.c=value` into (['a', 'b', 'c'], value), the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(mapping: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies dotted `key=value` overrides to a nested mapping (in place) and returns it.

    Intermediate mappings are created where absent; whether the key exists is checked by
    `build`, which names the full dotted key if it does not. In a list of named mappings (a run's
    `stages`), a key picks the entry of that name: `stages.transfer.steps=50`.
    """
    for text in overrides:
        keys, value = parse_override(text)
        node, index = mapping, 0
        while index < len(keys) - 1:
            where = ".".join(keys[:index + 1])
            child = node.get(keys[index])
            if child is None:
                child = node[keys[index]] = {}
            elif _named_entries(child):
                index += 1  # the next key names the entry
                if index == len(keys) - 1:
                    raise ConfigError(f"{text.partition('=')[0]}: name a key of the entry {keys[index]!r} of {where}, "
                                      "or give the whole list")
                entry = next((entry for entry in child if entry["name"] == keys[index]), None)
                if entry is None:
                    raise ConfigError(f"{where}.{keys[index]}: {where} has no entry named {keys[index]!r} (its "
                                      f"entries: {', '.join(entry['name'] for entry in child)})")
                child = entry
            elif not isinstance(child, dict):
                raise ConfigError(f"{where}: is a value, cannot set {'.'.join(keys)}")
            node, index = child, index + 1
        node[keys[-1]] = value
    return mapping


def _named_entries(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(entry, dict) and "name" in entry
                                                           for entry in value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
