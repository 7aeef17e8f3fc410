"""Code of the user's that registers mixers, named by a model config's `imports`.

An entry is a module (`my_pkg.my_mixers`, found on sys.path, e.g. through PYTHONPATH) or a Python
file (`./my_mixer.py`, `/abs/path/mixers.py`: an entry ending in `.py` or holding a `/`). Importing
it runs its `@register_mixer(...)` decorators, so the layer pattern can then name its mixers. A
file is imported as the module its stem names (`my_mixer`), once per process. Installed
packages register theirs through the `seqmix.mixers` entry points instead
(`seqmix.mixers.registry`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from seqmix.configuration import ConfigError


def is_file(entry: str) -> bool:
    """Whether an `imports` entry names a Python file (else a module)."""
    return entry.endswith(".py") or "/" in entry


def resolved_files(entries, config_file: str | Path | None, key: str):
    """`entries` (a config's `imports` as read, checked by `build` later) with each relative file
    made absolute: the file beside `config_file` (the YAML that names it), else in the working
    directory; a ConfigError naming `key[i]` and the places looked in when neither holds it.
    Absolute files and modules pass unchanged."""
    if not isinstance(entries, list):
        return entries
    resolved = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str) and is_file(entry) and not Path(entry).is_absolute():
            candidates = ([Path(config_file).parent / entry] if config_file is not None else []) + [Path(entry)]
            found = next((candidate for candidate in candidates if candidate.is_file()), None)
            if found is None:
                raise ConfigError(f"{key}[{index}]: file {entry!r} not found (looked for "
                                  f"{' and '.join(str(candidate.absolute()) for candidate in candidates)})")
            entry = str(found.resolve())
        resolved.append(entry)
    return resolved


def import_all(entries: list[str], key: str) -> None:
    """Imports each module or file of `entries` (a relative file from the working directory),
    those already imported not again. A module that cannot be imported, a missing file, one whose
    stem is another module's name, or code that fails to import (ImportError, SyntaxError):
    a ConfigError naming `key[i]` and the module or file. Other errors of the imported code
    propagate with their traceback (a bug of the user's)."""
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if is_file(entry):
            _import_file(Path(entry), where)
            continue
        try:
            importlib.import_module(entry)
        except ImportError as err:
            hint = " (modules are found on sys.path: set PYTHONPATH, or name its file)" if err.name == entry else ""
            raise ConfigError(f"{where}: cannot import module {entry!r}: {err}{hint}") from err


def _import_file(path: Path, where: str) -> None:
    """Imports the file `path` as the module its stem names, as `import <stem>` would with the file
    on sys.path: the same module if it is on sys.path (or imported) already, and refused if that
    name is another module's (which the file would hide from whatever imports it later)."""
    path = path.absolute().resolve()
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"{where}: {path} is not a Python file" if path.exists() else
                          f"{where}: file {path} not found")
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"{where}: {path.name} cannot name a module (letters, digits and _): rename the file")
    try:
        found = importlib.util.find_spec(name)
        if found is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            # In sys.modules before it runs, as an import does: dataclasses and
            # typing.get_type_hints look its annotations up there.
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        elif found.origin is not None and Path(found.origin).resolve() == path:
            importlib.import_module(name)
        else:
            raise ConfigError(f"{where}: {path} would be imported as the module {name!r}, which is "
                              f"{found.origin or 'built in'}: rename the file")
    except (ImportError, SyntaxError) as err:
        raise ConfigError(f"{where}: cannot import {path}: {type(err).__name__}: {err}") from err
