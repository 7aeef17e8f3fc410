"""Logit distillation: the KL divergence from a frozen teacher's next-token distribution to the
student's, KL(p_teacher || p_student) per token (RADLADS' and LoLCATs' last stage), summed over
the scored tokens, from logits or, for large vocabularies, from both models' final hidden states
and heads in blocks of tokens, so that neither [B, T, vocab] logits tensor ever exists whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.models.lm import soft_capped
from seqmix.train.loss import token_blocks


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
