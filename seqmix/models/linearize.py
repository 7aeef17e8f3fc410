"""Linearization: a pretrained attention model becomes a gated recurrent (or hybrid) one that
keeps its parameters. Each converted layer is a mixer over the attention layer's own q/k/v/o
projections, so the weights carry over unchanged:

    liger_gla        gated recurrence, gate logsigmoid(k) / 16, softmax feature maps (Liger)
    liger_hgrn2      HGRN2 recurrence: forget gate sigmoid(k), key 1 - gate, softmax(q) (Liger)
    liger_attention  0.5 * liger_gla + 0.5 * sliding-window softmax (window 64) (Liger)
    lolcats          softmax over the last 64 tokens + Hedgehog linear attention over older ones
                     (LoLCATs); its feature maps and window factors are new `TransferParam`s,
                     which attention transfer (`seqmix.train.attention_transfer`) trains first

Layers listed in `keep` stay softmax attention (a hybrid, e.g. every 8th layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.layers.transfer import TransferParam
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel

METHODS = {  # the converted layers' mixer options
    "liger_gla": {"type": "liger_attention", "recurrence": "gla", "window": None},
    "liger_hgrn2": {"type": "liger_attention", "recurrence": "hgrn2", "window": None},
    "liger_attention": {"type": "liger_attention", "recurrence": "gla", "window": 64},
    "lolcats": {"type": "lolcats", "window": 64},
}


def linearized_config(config: ModelConfig, method: str, *, keep: Sequence[int] = ()) -> ModelConfig:
    """The config of `config`'s model with every attention layer not in `keep` (layer indices)
    replaced by the `method` conversion (a key of METHODS)."""
    if method not in METHODS:
        raise ConfigError(f"linearize: unknown method {method!r} (known: {', '.join(METHODS)})")
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
        mixers[converted] = {**METHODS[method], "qkv_bias": options.qkv_bias}
    return build(ModelConfig, {**to_dict(config), "layer_pattern": kinds, "mixers": mixers}, "linearize")


def linearize(model: LanguageModel, config: ModelConfig, method: str, *, keep: Sequence[int] = ()
              ) -> tuple[LanguageModel, ModelConfig]:
    """(the converted model, its config): `linearized_config`'s architecture holding a copy of
    `model`'s parameters (the teacher stays usable), with no training step taken. Parameters
    the conversion adds (LoLCATs' `TransferParam`s) get their initialisation, computed alone:
    nothing else of the student is ever initialised."""
    student_config = linearized_config(config, method, keep=keep)
    build = lambda: LanguageModel(student_config, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    teacher_state = nnx.state(model)
    missing = {path for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Not(TransferParam)))} - {
        path for path, _ in nnx.to_flat_state(teacher_state)}
    if missing:
        raise ConfigError(f"linearize: the teacher has no {'.'.join(map(str, sorted(missing)[0]))}")
    # Compiled, the random initialisers of the other weights are dead code.
    added = jax.jit(lambda: nnx.state(build(), TransferParam))()
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, teacher_state), added), student_config
