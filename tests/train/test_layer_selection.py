"""Layer selection by KL: in a teacher whose middle layer alone does any attending (the other two
layers' attention outputs are zeroed), linearizing an idle layer costs nothing and linearizing the
middle one costs KL, so the middle layer is kept as attention (`seqmix linearize --select-layers`
runs in tests/train/test_linearize_run.py)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seqmix.configuration import ConfigError, build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.layer_selection import linearization_kl, select_layers

CONFIG = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 2, "init_std": 0.3}, "model")


def planted_teacher() -> LanguageModel:
    teacher = LanguageModel(CONFIG, rngs=nnx.Rngs(0))
    for idle in (0, 2):
        kernel = teacher.layers[idle].self_attn.o_proj.kernel
        kernel.set_value(jnp.zeros_like(kernel[...]))
    return teacher


def test_the_layer_that_attends_scores_highest_and_is_kept():
    tokens = jax.random.randint(jax.random.key(0), (2, 48), 0, 256)
    segment_ids = jnp.concatenate([jnp.ones((2, 30), jnp.int32), jnp.full((2, 18), 2, jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(30), jnp.arange(18)])[None].repeat(2, axis=0)
    batch = {"inputs": tokens, "segment_ids": segment_ids, "positions": positions}
    scores = linearization_kl(planted_teacher(), CONFIG, "liger_gla", [batch])
    assert list(scores) == [0, 1, 2]
    assert scores[0] < 1e-6 and scores[2] < 1e-6 and scores[1] > 1e-3, scores
    assert select_layers(scores, 1) == [1]


def test_selection_keeps_the_highest_scores_in_layer_order():
    assert select_layers({0: 0.5, 1: 0.1, 2: 0.5, 3: 0.7}, 2) == [0, 3]
    with pytest.raises(ConfigError, match="--select-layers: keep between 1 and 3 of the 4 attention layers, got 4"):
        select_layers({0: 0.5, 1: 0.1, 2: 0.5, 3: 0.7}, 4)
