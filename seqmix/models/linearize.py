"""Linearization: a pretrained attention model becomes a gated recurrent (or hybrid) one with the
same parameters, as in Liger (Lan et al. 2025). Each converted layer is a `liger_attention`
mixer over the attention layer's own q/k/v/o projections, so the weights carry over unchanged:

    liger_gla        gated recurrence, gate logsigmoid(k) / 16, softmax feature maps
    liger_hgrn2      HGRN2 recurrence: forget gate sigmoid(k), key 1 - gate, softmax(q)
    liger_attention  0.5 * liger_gla + 0.5 * sliding-window softmax (window 64)

Layers listed in `keep` stay softmax attention (a hybrid, e.g. every 8th layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel

METHODS = {
    "liger_gla": {"recurrence": "gla", "window": None},
    "liger_hgrn2": {"recurrence": "hgrn2", "window": None},
    "liger_attention": {"recurrence": "gla", "window": 64},
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
        mixers[converted] = {"type": "liger_attention", "qkv_bias": options.qkv_bias, **METHODS[method]}
    return build(ModelConfig, {**to_dict(config), "layer_pattern": kinds, "mixers": mixers}, "linearize")


def linearize(model: LanguageModel, config: ModelConfig, method: str, *, keep: Sequence[int] = ()
              ) -> tuple[LanguageModel, ModelConfig]:
    """(the converted model, its config): `linearized_config`'s architecture holding a copy of
    `model`'s parameters (the teacher stays usable), with no training step taken."""
    student_config = linearized_config(config, method, keep=keep)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(student_config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, nnx.state(model))), student_config
