"""Attention transfer (LoLCATs stage 1): each converted layer is scored on the teacher's own input
against the teacher layer's output; training moves the transfer parameters alone and lowers
that error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import ConfigError, build
from seqmix.layers.transfer import TransferParam
from seqmix.models.config import ModelConfig
from seqmix.models.linearize import linearize, linearized_config
from seqmix.models.lm import LanguageModel, positions_from_segments
from seqmix.train.attention_transfer import attention_transfer, converted_layers, transfer_loss

TEACHER = build(ModelConfig, {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
                              "init_std": 0.3}, "model")


def batch(seed, length=48):
    inputs = jax.random.randint(jax.random.key(seed), (4, length), 0, 64)
    segment_ids = jnp.array([[1] * length, [1] * 30 + [2] * (length - 30), [1] * (length - 5) + [0] * 5,
                             [1] * length])
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions_from_segments(segment_ids)}


def lolcats_student(teacher, window, keep=()):
    config = linearized_config(TEACHER, "lolcats", keep=keep)
    config.mixers = {kind: {**options, "window": window} for kind, options in config.mixers.items()}
    student = LanguageModel(config, rngs=nnx.Rngs(1))
    nnx.update(student, nnx.state(teacher))
    return student


def loss_of(student, teacher, data):
    pairs = teacher.mixer_inputs_and_outputs(data["inputs"], segment_ids=data["segment_ids"],
                                             positions=data["positions"])
    return float(transfer_loss(student, pairs, data["segment_ids"], data["positions"], converted_layers(student)))


def test_a_window_that_covers_every_token_is_the_teachers_attention_at_every_layer():
    """With W >= T there are no older tokens and LoLCATs is softmax attention exactly, so the
    loss is zero only if every layer gets the teacher's own input (layers 1 and 2 included)."""
    teacher = LanguageModel(TEACHER, rngs=nnx.Rngs(0))
    data = batch(0)
    assert loss_of(lolcats_student(teacher, window=48), teacher, data) < 1e-10
    assert loss_of(lolcats_student(teacher, window=8), teacher, data) > 1e-3


def test_training_moves_only_the_transfer_parameters_and_lowers_the_error():
    teacher = LanguageModel(TEACHER, rngs=nnx.Rngs(0))
    student = lolcats_student(teacher, window=8, keep=[2])
    before = nnx.to_flat_state(jax.tree.map(np.asarray, nnx.state(student)))
    held_out = loss_of(student, teacher, batch(100))  # a batch training never sees
    attention_transfer(teacher, student, (batch(seed) for seed in range(40)), steps=40, lr=1e-1)
    assert converted_layers(student) == [0, 1]
    assert loss_of(student, teacher, batch(100)) < 0.8 * held_out
    transfer = {path for path, _ in nnx.to_flat_state(nnx.state(student, TransferParam))}
    after = dict(nnx.to_flat_state(nnx.state(student)))
    for path, old in before:
        moved = bool(np.any(np.asarray(after[path].get_value()) != old.get_value()))
        assert moved == (path in transfer), path


def test_a_model_without_transfer_parameters_is_refused():
    teacher = LanguageModel(TEACHER, rngs=nnx.Rngs(0))
    student, _ = linearize(teacher, TEACHER, "liger_attention")
    with pytest.raises(ConfigError, match="no converted layer with transfer parameters"):
        attention_transfer(teacher, student, iter([batch(0)]), steps=1, lr=1e-2)
