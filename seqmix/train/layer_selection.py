"""Which layers of a teacher stay softmax attention when the rest are linearized: each attention
layer is scored by how far the teacher's next-token distribution moves when that one layer alone
is linearized, KL(teacher || teacher with layer i converted) per token on calibration batches, and
the layers that move it most are kept (layer selection by KL, which beats uniform interleaving in
the hybrid-distillation studies). The conversion is scored as initialised, before any training:
what the layer loses by becoming linear with the teacher's own projections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from seqmix.configuration import ConfigError
from seqmix.models.config import ModelConfig
from seqmix.models.linearize import linearize
from seqmix.models.lm import LanguageModel
from seqmix.train.evaluate import held_out_kl


def linearization_kl(teacher: LanguageModel, config: ModelConfig, method: str,
                     batches: Iterable[Mapping[str, np.ndarray]]) -> dict[int, float]:
    """{attention layer index: mean KL(teacher || teacher with that layer alone converted by
    `method`), nats per real token over `batches`} (dicts of [B, T] "inputs", "segment_ids",
    "positions", as the input pipeline yields them)."""
    batches = list(batches)
    attention = [index for index, kind in enumerate(config.layer_kinds()) if config.mixer(kind)[0].name == "attention"]
    scores = {}
    for layer in attention:
        student, _ = linearize(teacher, config, method, keep=[index for index in attention if index != layer])
        scores[layer] = held_out_kl(student, teacher, batches, len(batches))["kl"]
    return scores


def select_layers(scores: Mapping[int, float], keep: int) -> list[int]:
    """The `keep` layers of highest score (ties to the earlier layer), in layer order."""
    if not 0 < keep < len(scores):
        raise ConfigError(f"--select-layers: keep between 1 and {len(scores) - 1} of the {len(scores)} attention "
                          f"layers, got {keep}")
    return sorted(sorted(scores, key=lambda layer: (-scores[layer], layer))[:keep])
