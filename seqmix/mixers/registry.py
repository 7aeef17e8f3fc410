"""Registry of sequence mixers by name, so a model's layer pattern can name them.

The mixer contract, what a mixer provides (`tests/mixers/test_mixers.py` checks it of each of
seqmix's mixers, through a case of its own there):

- Options: a dataclass (`config_cls`), every field with a default (a layer pattern may name the
  mixer without options) and a type that `seqmix.configuration.build` checks (bool, int, float,
  str, Literal, lists, dicts, nested option dataclasses, `| None`); a model sets them per layer
  kind (`model.mixers.<kind>.<field>`). It may
  define `validate(self, path)`, raising a ConfigError that names `path.<field>` (`require`). A
  mixer that can read the tokens after each token has a field `causal: bool` (default true;
  `ModelConfig.non_causal_layers` reads it, in nested options too): a model with `causal: false`
  layers trains with `objective: mlm` and never decodes.
- Construction: `Mixer(model_config, options, *, rngs)` (with `layer_index=`, 0-based, too when
  registered `depth_aware=True`, for designs that vary with depth, as Lightning's decays). Sizes
  come from the `ModelConfig` (d_model, n_heads, kv_heads, dim_per_head, n_layers, init_std,
  norm_eps). Models are built under `nnx.eval_shape`/jit: no Python conversion of an array in
  `__init__`. Parameters are `nnx.Param`s, float32 and strongly typed (a weak type recompiles the
  train step after the first update), with logical axis names for sharding
  (`layers.linear.projection`); activations may be pinned to logical axes too
  (`layers.partitioning.constrained`).
- `__call__(x, *, segment_ids=None, positions=None, cache=None) -> (y, cache)`: x and y [B, T, D]
  in the compute dtype (states, gates and softmax statistics accumulate in float32).
  segment_ids [B, T] int32 or None: 0 = padding; no state, attention or convolution crosses from
  one segment to the next, and a padding token changes no other token's output nor the cached
  state (only the count of tokens seen).
  positions [B, T] int32 or None: each token's position (None: its index within its segment).
  The same module serves three paths, which must agree: `cache=None` (training and scoring: the
  whole sequence, returning `(y, None)`), and with a cache a prefill (T > 1, left padding marked
  by segment_ids) or a decode step (T = 1), each continuing from the cache and returning it
  updated.
- `init_cache(batch, max_len, dtype) -> cache`: the cache of rows of up to max_len tokens, a pytree
  of arrays (a `flax.struct.dataclass`) whose shapes depend on (batch, max_len) alone, so that one
  jitted decode step serves every token and `jax.eval_shape` sizes it before anything is allocated
  (`models.generate.cache_length`). It must carry `lengths` [B] int32: tokens seen per row,
  padding included, advanced by T on every call; `LanguageModel.extend` reads `cache[0].lengths`
  for default positions and `generate` for its decode positions, and every layer's agree. The rest
  is the mixer's: a float32 state [B, H, K, V] and short-convolution tails for recurrent mixers
  (`recurrent.RecurrentCache`, whose size does not grow with max_len; a `RecurrentMixer` names its
  convolutions in `CONVOLUTIONS` and inherits init_cache), a ring of the last `window`
  keys and values for a sliding window, max_len slots only for global attention (`attention.KVCache`,
  keys and values in `dtype`); a layer that keeps nothing still counts (`feed_forward.TokenCount`).
  A non-causal mixer's init_cache raises.
- Optional: `learn_initial_state()` (the `state_tuning.LearnsInitialState` mixin) turns the state
  each row starts from into a trained `InitialState` parameter (state tuning), which its forward and
  init_cache start from; `MixerSpec.learns_initial_state` says whether a mixer has it. An auxiliary
  loss is sown as `self.sow(nnx.Intermediate, "aux_loss", value, capture_noop=True)`.

Where mixers come from: seqmix's own register when `seqmix.mixers` is imported; a user's, with
`@register_mixer(name, Options)` in a module or file that a model config lists in `imports`
(`seqmix.plugins`); an installed package's, through an entry point of the group `seqmix.mixers`
(in its pyproject.toml: `[project.entry-points."seqmix.mixers"] my_mixers = "my_pkg.my_mixers"`),
whose module is imported the first time a name is looked up and not found, or the registry listed.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Callable

from seqmix.configuration import ConfigError

ENTRY_POINT_GROUP = "seqmix.mixers"


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
    """The mixer registered as `name` (installed packages' entry points loaded if it is not yet);
    a ConfigError naming `path` if there is none."""
    if name not in _MIXERS:
        _load_entry_points()
    if name not in _MIXERS:
        raise ConfigError(f"{path}: unknown mixer {name!r} (registered: {', '.join(sorted(_MIXERS))}; a mixer of "
                          "your own: list its module or file in model.imports)")
    return _MIXERS[name]


def registered_mixers() -> list[str]:
    """The names of every registered mixer, installed packages' included, sorted."""
    _load_entry_points()
    return sorted(_MIXERS)


_entry_points_loaded = False


def _load_entry_points() -> None:
    """Imports the module of every `seqmix.mixers` entry point of the installed packages, which
    registers their mixers; once per process (the flag is set when all of them have loaded, so a
    failing one fails again, naming itself, rather than leaving its mixers silently missing)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as err:
            package = entry_point.dist.name if entry_point.dist is not None else "an installed package"
            raise ConfigError(f"entry point {entry_point.name} = {entry_point.value} (group {ENTRY_POINT_GROUP}, "
                              f"of {package}) failed to load: {type(err).__name__}: {err}") from err
    _entry_points_loaded = True
