"""Attention transfer, LoLCATs' stage 1: the parameters a conversion added (`TransferParam`s:
Hedgehog feature maps, window factors) learn to make each converted layer reproduce its teacher
attention layer's output, everything else frozen.

Every converted layer is fed the teacher's own input to that layer and fitted to the teacher
layer's output, so the layers do not depend on one another: training them together on the sum
of their losses is training each alone, layer by layer, from one teacher forward per batch. The
loss of a layer is its relative squared error over real tokens,
    sum |y_student - y_teacher|^2 / sum |y_teacher|^2,
averaged over the converted layers (LoLCATs' MSE, made independent of the outputs' scale).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqmix.configuration import ConfigError
from seqmix.layers.transfer import TransferParam
from seqmix.models.lm import LanguageModel


def converted_layers(model: LanguageModel) -> list[int]:
    """Indices of the layers whose mixer has `TransferParam`s."""
    return [index for index, layer in enumerate(model.layers)
            if jax.tree.leaves(nnx.state(layer.self_attn, TransferParam))]


def transfer_loss(student: LanguageModel, teacher_pairs, segment_ids, positions, layers: list[int]) -> jax.Array:
    """Mean over `layers` of each converted mixer's relative squared error (float32 scalar)
    against the teacher's output, both on the teacher's input (teacher_pairs: the teacher's
    `mixer_inputs_and_outputs`); segment_ids, positions [B, T] as for the model, 0 = padding."""
    real = (segment_ids != 0)[..., None]
    errors = []
    for index in layers:
        mixer_input, target = teacher_pairs[index]
        out, _ = student.layers[index].self_attn(mixer_input, segment_ids=segment_ids, positions=positions)
        target = jnp.where(real, target.astype(jnp.float32), 0.0)
        errors.append(jnp.sum((jnp.where(real, out.astype(jnp.float32), 0.0) - target) ** 2) / jnp.sum(target ** 2))
    return sum(errors) / len(errors)


def attention_transfer(teacher: LanguageModel, student: LanguageModel, batches: Iterable[Mapping[str, np.ndarray]],
                       *, steps: int, lr: float) -> list[float]:
    """Trains the student's `TransferParam`s in place for `steps` Adam steps (learning rate
    `lr`) on `batches` (dicts of [B, T] "inputs", "segment_ids", "positions", as the input
    pipeline yields them) and returns the loss of every step. The student's layers are the
    teacher's, converted (`seqmix.models.linearize`): layer i is fitted to teacher layer i."""
    layers = converted_layers(student)
    if not layers:
        raise ConfigError("attention_transfer: the model has no converted layer with transfer parameters "
                          "(e.g. lolcats) to train")
    if len(teacher.layers) != len(student.layers):
        raise ConfigError(f"attention_transfer: the teacher has {len(teacher.layers)} layers, "
                          f"the model {len(student.layers)}")
    graphdef, params, frozen = nnx.split(student, TransferParam, ...)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, frozen, teacher_state, inputs, segment_ids, positions):
        pairs = nnx.merge(teacher_graphdef, teacher_state).mixer_inputs_and_outputs(
            inputs, segment_ids=segment_ids, positions=positions)
        pairs = jax.lax.stop_gradient(pairs)
        loss, grads = jax.value_and_grad(
            lambda params: transfer_loss(nnx.merge(graphdef, params, frozen), pairs, segment_ids, positions, layers)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _, batch in zip(range(steps), batches):
        params, opt_state, loss = step(params, opt_state, frozen, teacher_state,
                                       batch["inputs"], batch["segment_ids"], batch["positions"])
        losses.append(float(loss))
    if len(losses) < steps:
        raise ConfigError(f"attention_transfer: the data ran out after {len(losses)} of {steps} steps")
    nnx.update(student, params)
    return losses
