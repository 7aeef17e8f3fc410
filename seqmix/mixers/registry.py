"""Registry of sequence mixers by name, so a model's layer pattern can name them.

A mixer is an `nnx.Module` constructed as `Mixer(model_config, mixer_config, rngs=...)` with
`__call__(x, *, segment_ids=None, positions=None, cache=None) -> (y, cache)` and
`init_cache(batch, max_len, dtype)`. Its options live in a dataclass (`config_cls`) whose fields
a model config may set per layer kind (`model.mixers.<kind>.<field>`). A mixer registered with
`depth_aware=True` also gets `layer_index=` (0-based) to construct, for designs that vary with
depth (Lightning's decays shrink from the first layer to the last). A mixer with a recurrent state
may also define `learn_initial_state()`, which turns the state it starts each row from into a
trained `InitialState` parameter (state tuning); `MixerSpec.learns_initial_state` says whether it
does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from seqmix.configuration import ConfigError


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    module_cls: type
    config_cls: type
    depth_aware: bool = False

    @property
    def learns_initial_state(self) -> bool:
        """Whether the mixer can learn the state it starts each row from (`tune: state`)."""
        return callable(getattr(self.module_cls, "learn_initial_state", None))

    def build(self, model_config, mixer_config, layer_index: int, *, rngs):
        """The mixer module of layer `layer_index` of a model."""
        depth = {"layer_index": layer_index} if self.depth_aware else {}
        return self.module_cls(model_config, mixer_config, **depth, rngs=rngs)


_MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, config_cls: type, *, depth_aware: bool = False) -> Callable[[type], type]:
    """Class decorator registering an `nnx.Module` mixer under `name` with its config dataclass
    (`depth_aware`: the constructor takes `layer_index`)."""

    def decorator(module_cls: type) -> type:
        if name in _MIXERS and _MIXERS[name].module_cls is not module_cls:
            raise ValueError(f"a mixer named {name!r} is already registered ({_MIXERS[name].module_cls})")
        _MIXERS[name] = MixerSpec(name, module_cls, config_cls, depth_aware)
        return module_cls

    return decorator


def get_mixer(name: str, path: str = "mixer") -> MixerSpec:
    if name not in _MIXERS:
        raise ConfigError(f"{path}: unknown mixer {name!r} (registered: {', '.join(sorted(_MIXERS))})")
    return _MIXERS[name]


def registered_mixers() -> list[str]:
    return sorted(_MIXERS)

