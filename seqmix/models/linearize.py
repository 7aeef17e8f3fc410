"""Linearization: a pretrained attention model becomes a gated recurrent (or hybrid) one that
keeps its parameters. Each converted layer is a mixer over the attention layer's own q/k/v/o
projections, so the weights carry over unchanged:

    liger_gla        gated recurrence, gate logsigmoid(k) / 16, softmax feature maps (Liger)
    liger_hgrn2      HGRN2 recurrence: forget gate sigmoid(k), key 1 - gate, softmax(q) (Liger)
    liger_attention  0.5 * liger_gla + 0.5 * sliding-window softmax (window 64) (Liger)
    lolcats          softmax over the last 64 tokens + Hedgehog linear attention over older ones
                     (LoLCATs); its feature maps and window factors are new `TransferParam`s,
                     which attention transfer (a `distill: {loss: attention_output, train: new}`
                     stage, `configs/runs/lolcats.yaml`) trains first

or becomes a *student*: any mixer of `seqmix.mixers.students.RECIPES` (gla, deltanet,
gated_deltanet, hgrn2, retnet, mamba2, rwkv6, kda, rwkv7) initialised from the attention layer's
q/k/v/o (key/value heads repeated to the query heads), its other parameters new `TransferParam`s at
values that make it start as linear attention over the teacher's projections. A conversion name
(`method` below) is a METHODS key or a student's mixer name.

Layers listed in `keep` stay softmax attention (a hybrid, e.g. every 8th layer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.mixers.students import RECIPES, from_teacher
from seqmix.models.config import ModelConfig
from seqmix.models.hf import CHECKPOINT_PARAMS, config_from_hf, read_weights
from seqmix.models.lm import LanguageModel

METHODS = {  # the converted layers' mixer options
    "liger_gla": {"type": "liger_attention", "recurrence": "gla", "window": None},
    "liger_hgrn2": {"type": "liger_attention", "recurrence": "hgrn2", "window": None},
    "liger_attention": {"type": "liger_attention", "recurrence": "gla", "window": 64},
    "lolcats": {"type": "lolcats", "window": 64},
}
STUDENTS = tuple(RECIPES)
# Attention options whose effect on q, k, v or the output no student reproduces (Qwen3's q/k norms,
# gated attention, an o_proj bias, Falcon-H1's key multiplier): refused rather than dropped.
_UNCARRIED = {"qk_norm": None, "output_gate": False, "output_bias": False, "key_multiplier": 1.0, "causal": True}


def linearized_config(config: ModelConfig, method: str, *, keep: Sequence[int] = ()) -> ModelConfig:
    """The config of `config`'s model with every attention layer not in `keep` (layer indices)
    replaced by the `method` conversion (a key of METHODS, or a student mixer of STUDENTS)."""
    if method not in METHODS and method not in STUDENTS:
        raise ConfigError(f"linearize: unknown method {method!r} (known: {', '.join(METHODS)}; students: "
                          f"{', '.join(STUDENTS)})")
    outside = sorted(set(keep) - set(range(config.n_layers)))
    if outside:
        raise ConfigError(f"linearize.keep: layer {outside[0]} is not in 0..{config.n_layers - 1}")
    kinds, mixers = [], {}
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        if spec.name != "attention" or index in keep:
            kinds.append(kind)
            if kind in config.mixers:
                mixers[kind] = config.mixers[kind]
            continue
        converted = f"{method}_{kind}"  # one converted kind per source kind keeps its q/k/v biases
        kinds.append(converted)
        for key, plain in _UNCARRIED.items():  # a conversion without them would compute something else
            if getattr(options, key) != plain:
                raise ConfigError(f"linearize {method}: the teacher's attention ({kind}) has {key} "
                                  f"{getattr(options, key)!r}, which no conversion carries over")
        if method in METHODS:
            mixers[converted] = {**METHODS[method], "qkv_bias": options.qkv_bias}
        else:
            mixers[converted] = {"type": "student", "mixer": method, "qkv_bias": options.qkv_bias}
    return build(ModelConfig, {**to_dict(config), "layer_pattern": kinds, "mixers": mixers}, "linearize")


def student_lora_targets(student: str, *, keeps_attention: bool) -> list[str]:
    """LoRA targets for a `student` conversion (Liger's recipe, q/k/v): the student's projections
    that hold the teacher's q, k, v, and attention's own when some layers stay attention."""
    targets = RECIPES[student].qkv_projections()
    return targets + [name for name in ("q_proj", "k_proj", "v_proj") if keeps_attention and name not in targets]


def _student_layers(config: ModelConfig) -> dict[int, str]:
    """{layer index: student mixer name} of the student layers of a model config."""
    layers = {}
    for index, kind in enumerate(config.layer_kinds()):
        spec, options = config.mixer(kind)
        if spec.name == "student":
            layers[index] = options.mixer
    return layers


def converted_weights(teacher: nnx.State, teacher_config: ModelConfig, params: nnx.State,
                      config: ModelConfig) -> nnx.State:
    """`params` (checkpoint parameters of a `linearized_config` model of `config`, abstract or not;
    a LoRA-wrapped projection's `base` counts as the projection) with their values from the teacher's
    parameters `teacher` (of `teacher_config`): a student layer's by `seqmix.mixers.students.from_teacher`,
    every other parameter the teacher's of the same path."""
    strip = lambda path: tuple(part for part in path if part != "base")
    arrays = {strip(path): variable.get_value() for path, variable in nnx.to_flat_state(teacher)}
    taught = {}
    for index, mixer in _student_layers(config).items():
        prefix = ("layers", index, "self_attn")
        layer = {".".join(map(str, path[3:])): value for path, value in arrays.items() if path[:3] == prefix}
        taught.update({(*prefix, *name.split(".")): value
                       for name, value in from_teacher(mixer, layer, teacher_config.dim_per_head).items()})
    converted = []
    for path, variable in nnx.to_flat_state(params):
        key = strip(path)
        value = taught[key] if key in taught else arrays.get(key)
        if value is None or value.shape != variable.shape:
            found = "absent" if value is None else f"of shape {value.shape}"
            raise ConfigError(f"linearize: {'.'.join(map(str, key))} {variable.shape} of the student is {found} "
                              "in the teacher")
        converted.append((path, variable.replace(value=jnp.asarray(value, variable.dtype))))
    return nnx.from_flat_state(converted)


def read_initial_weights(path: str | os.PathLike, params: nnx.State, config: ModelConfig) -> nnx.State:
    """`read_weights` for a run's `init_from`: the checkpoint's tensors by torch name, or, for a
    model with student layers, the teacher checkpoint read whole into its own model and converted
    (`converted_weights`), since a student's parameters have other names and shapes."""
    if not _student_layers(config):
        return read_weights(path, params, config)
    teacher_config = config_from_hf(json.loads((Path(path) / "config.json").read_text()),
                                    str(Path(path) / "config.json"))
    abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(teacher_config, rngs=nnx.Rngs(0))), CHECKPOINT_PARAMS)
    return converted_weights(read_weights(path, abstract, teacher_config), teacher_config, params, config)


def linearize(model: LanguageModel, config: ModelConfig, method: str, *, keep: Sequence[int] = ()
              ) -> tuple[LanguageModel, ModelConfig]:
    """(the converted model, its config): `linearized_config`'s architecture holding a copy of
    `model`'s parameters (the teacher stays usable), with no training step taken. Parameters
    the conversion adds (`TransferParam`s: LoLCATs' maps, a student's gates) get their
    initialisation, computed alone: nothing else of the student is ever initialised."""
    student_config = linearized_config(config, method, keep=keep)
    build = lambda: LanguageModel(student_config, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    taught = converted_weights(jax.tree.map(jnp.copy, nnx.state(model, CHECKPOINT_PARAMS)), config,
                               nnx.state(abstract, CHECKPOINT_PARAMS), student_config)
    # Compiled, the random initialisers of the other weights are dead code.
    added = jax.jit(lambda: nnx.state(build(), nnx.Not(CHECKPOINT_PARAMS)))()
    return nnx.merge(graphdef, taught, added), student_config
