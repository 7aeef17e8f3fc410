"""Distillation from a frozen teacher, the losses of a run's `distill:` stage (RADLADS' three
stages, LoLCATs' two), each summed over a micro-batch so that the train step divides once:

- attention output: each layer the conversion replaced, fed the teacher's own input to that
  layer, fits the teacher layer's mixer output (relative squared error over the real tokens);
- hidden states: each block's output in the student's own forward fits the teacher block's;
- logits: KL(p_teacher || p_student) of the next-token distributions per token, from logits or,
  for large vocabularies, from both models' final hidden states and heads in blocks of tokens,
  so that neither [B, T, vocab] logits tensor ever exists whole; optionally plus the LM loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from seqmix.configuration import ConfigError
from seqmix.models.config import ModelConfig
from seqmix.models.hf import from_pretrained, pretrained_config
from seqmix.models.lm import LanguageModel, soft_capped
from seqmix.train.loss import chunked_cross_entropy_sum, cross_entropy_sum, token_blocks
from seqmix.train.sharding import state_shardings

TEACHER_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over tokens of KL(softmax(teacher) || softmax(student)), the number of tokens), float32
    scalars. logits [B, T, V] (any float dtype, computed in float32), mask [B, T] bool (False for
    padding). No gradient reaches the teacher."""
    teacher_log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    per_token = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(mask)


def chunked_kl_sum(features: jax.Array, head: jax.Array, teacher_features: jax.Array, teacher_head: jax.Array,
                   mask: jax.Array, *, chunk_tokens: int, soft_cap: float | None = None,
                   teacher_soft_cap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """`kl_sum(soft_capped(features @ head, soft_cap), soft_capped(teacher_features @ teacher_head,
    teacher_soft_cap), mask)` without either model's [B, T, V] logits: features [B, T, D] and head
    [D, V] (the student's `features` and `head_kernel()`), the teacher's likewise (its own D and
    dtype, the same V), mask [B, T] bool. Blocks of about chunk_tokens tokens (`token_blocks`), each
    block's logits recomputed in the backward pass (jax.checkpoint). Same value and gradients as
    the plain KL, up to float32 rounding."""
    teacher_head = jax.lax.stop_gradient(teacher_head)

    @jax.checkpoint
    def block_kl(head, x, teacher_x, weight):
        student_logits = soft_capped((x @ head).astype(jnp.float32), soft_cap)
        teacher_logits = soft_capped((teacher_x @ teacher_head).astype(jnp.float32), teacher_soft_cap)
        return kl_sum(student_logits, teacher_logits, weight)[0]

    def accumulate(total, block):
        return total + block_kl(head, *block), None

    weights = mask.astype(jnp.float32)
    blocks = token_blocks(chunk_tokens, features, jax.lax.stop_gradient(teacher_features), weights)
    total, _ = jax.lax.scan(accumulate, jnp.float32(0.0), blocks)
    return total, jnp.sum(weights)


# Tokens per block of a whole model's KL (as `loss_chunk_tokens`): no [B, T, vocab] logits of a large
# vocabulary exist whole, for either model.
KL_CHUNK_TOKENS = 2048


@nnx.jit
def model_kl_sum(student: LanguageModel, teacher: LanguageModel, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum over the real tokens of KL(p_teacher || p_student) of the two models' next-token
    distributions, the number of real tokens), float32 scalars, for a batch of [B, T] "inputs",
    "segment_ids" and "positions" (as the input pipeline yields them); in blocks of KL_CHUNK_TOKENS."""
    inputs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    return chunked_kl_sum(student.features(batch["inputs"], **inputs), student.head_kernel(),
                          teacher.features(batch["inputs"], **inputs), teacher.head_kernel(), batch["segment_ids"] != 0,
                          chunk_tokens=KL_CHUNK_TOKENS, soft_cap=student.logit_soft_cap,
                          teacher_soft_cap=teacher.logit_soft_cap)


def relative_squared_error(output: jax.Array, target: jax.Array, real: jax.Array) -> jax.Array:
    """sum |output - target|^2 / sum |target|^2 over the real tokens (float32 scalar): a fit
    independent of the outputs' scale. output, target [B, T, D] (any float dtype), real [B, T] bool."""
    real = real[..., None]
    target = jnp.where(real, target.astype(jnp.float32), 0.0)
    error = jnp.where(real, output.astype(jnp.float32), 0.0) - target
    return jnp.sum(error ** 2) / jnp.maximum(jnp.sum(target ** 2), jnp.finfo(jnp.float32).tiny)


def transfer_loss(student: LanguageModel, teacher_pairs, layers, real: jax.Array, **where) -> jax.Array:
    """Mean over `layers` of the relative squared error of each one's mixer, fed the teacher's input
    to that layer, against the teacher's mixer output (float32 scalar); teacher_pairs: the
    teacher's `mixer_inputs_and_outputs`, real [B, T] bool, where: the forward's segment_ids and
    positions [B, T]."""
    errors = [relative_squared_error(student.layers[index].self_attn(teacher_pairs[index][0], **where)[0],
                                     teacher_pairs[index][1], real) for index in layers]
    return sum(errors) / len(errors)


def replaced_layers(student: ModelConfig, teacher: ModelConfig) -> list[int]:
    """Indices of the layers whose mixer the student has instead of the teacher's (a conversion's
    layers; a hybrid teacher's own recurrent layers and the kept attention layers are not). The two
    have the same depth."""
    kinds = zip(student.layer_kinds(), teacher.layer_kinds())
    return [index for index, (ours, theirs) in enumerate(kinds)
            if student.mixer(ours)[0].name != teacher.mixer(theirs)[0].name]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What a distilling train step knows of its teacher besides the teacher's state (an argument
    of the step): its graph, the loss (a `DistillConfig.loss`), the cross-entropy's weight, the
    layers the conversion replaced."""

    graphdef: nnx.GraphDef
    loss: str
    lm_weight: float
    replaced: tuple[int, ...]


def load_teacher(directory: str, settings, student: ModelConfig, mesh: Mesh) -> tuple[Teacher, nnx.State]:
    """(Teacher, its state placed on `mesh` by the logical axis rules) of the checkpoint directory
    (Hugging Face or seqmix format), parameters in `settings.teacher_dtype` (a `DistillConfig`).
    Refuses a teacher of another depth or vocabulary, or a layer-wise loss with no replaced layer."""
    config = pretrained_config(directory)
    if (config.n_layers, config.vocab_size) != (student.n_layers, student.vocab_size):
        raise ConfigError(f"distill.teacher: {directory} has {config.n_layers} layers and {config.vocab_size} "
                         f"tokens, the model {student.n_layers} and {student.vocab_size}")
    replaced = replaced_layers(student, config)
    if settings.loss == "attention_output" and not replaced:
        raise ConfigError(f"distill.loss: attention_output fits replaced layers, and the model has the mixers of "
                         f"the teacher {directory} in every layer")
    graphdef, state = nnx.split(from_pretrained(directory, dtype=TEACHER_DTYPES[settings.teacher_dtype]))
    state = jax.device_put(state, state_shardings(state, mesh))
    return Teacher(graphdef, settings.loss, settings.lm_weight, tuple(replaced)), state


def distillation_sums(student: LanguageModel, teacher: Teacher, teacher_state: nnx.State, batch, scored: jax.Array,
                      loss_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """(the objective summed over the micro-batch: the mean loss times the token count, the token
    count), float32 scalars. batch: dict of [B, T] "inputs", "targets", "segment_ids",
    "positions"; scored [B, T] bool, the tokens the loss covers. The teacher is a constant."""
    frozen = nnx.merge(teacher.graphdef, jax.lax.stop_gradient(teacher_state))
    inputs = batch["inputs"]
    where = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    count = jnp.sum(scored).astype(jnp.float32)
    if teacher.loss == "attention_output":
        pairs = frozen.mixer_inputs_and_outputs(inputs, **where)
        return transfer_loss(student, pairs, teacher.replaced, scored, **where) * count, count
    if teacher.loss == "hidden_states":
        pairs = zip(student.layer_outputs(inputs, **where), frozen.layer_outputs(inputs, **where))
        errors = [relative_squared_error(ours, theirs, scored) for ours, theirs in pairs]
        return sum(errors) / len(errors) * count, count
    if loss_chunk_tokens:
        features, head = student.features(inputs, **where), student.head_kernel()
        total, _ = chunked_kl_sum(features, head, frozen.features(inputs, **where), frozen.head_kernel(), scored,
                                  chunk_tokens=loss_chunk_tokens, soft_cap=student.logit_soft_cap,
                                  teacher_soft_cap=frozen.logit_soft_cap)
        if teacher.lm_weight:
            total += teacher.lm_weight * chunked_cross_entropy_sum(
                features, head, batch["targets"], scored, chunk_tokens=loss_chunk_tokens,
                soft_cap=student.logit_soft_cap)[0]
        return total, count
    logits = student(inputs, **where)
    total, _ = kl_sum(logits, frozen(inputs, **where), scored)
    if teacher.lm_weight:
        total += teacher.lm_weight * cross_entropy_sum(logits, batch["targets"], scored)[0]
    return total, count
