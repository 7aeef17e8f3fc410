"""Logit distillation's KL: the blockwise form equals the plain one (value, and gradients of the
student's features and head; none reach the teacher), with soft caps, padding and blocks that do
not divide the rows; and the plain KL is the definition's, written in float64."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.train.distillation import chunked_kl_sum, kl_sum


def inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    features, teacher_features = jax.random.normal(keys[0], (2, 13, 8)), jax.random.normal(keys[1], (2, 13, 12))
    head, teacher_head = jax.random.normal(keys[2], (8, 50)), jax.random.normal(keys[3], (12, 50))
    mask = jnp.ones((2, 13), bool).at[1, 9:].set(False)
    return features, head, teacher_features, teacher_head, mask


def test_plain_kl_is_the_definition():
    features, head, teacher_features, teacher_head, mask = inputs()
    student, teacher = np.asarray(features @ head, np.float64), np.asarray(teacher_features @ teacher_head, np.float64)
    log_p = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    expected = (np.exp(log_p(teacher)) * (log_p(teacher) - log_p(student))).sum(-1)[np.asarray(mask)].sum()
    total, count = kl_sum(features @ head, teacher_features @ teacher_head, mask)
    assert abs(float(total) - expected) < 1e-4 * expected and count == 22
    assert float(kl_sum(teacher_features @ teacher_head, teacher_features @ teacher_head, mask)[0]) < 1e-3


def test_blockwise_kl_equals_the_plain_kl_with_its_gradients():
    features, head, teacher_features, teacher_head, mask = inputs()
    plain = lambda f, h, tf, th: kl_sum(5.0 * jnp.tanh(f @ h / 5.0), 7.0 * jnp.tanh(tf @ th / 7.0), mask)[0]
    blockwise = lambda f, h, tf, th: chunked_kl_sum(f, h, tf, th, mask, chunk_tokens=10, soft_cap=5.0,
                                                    teacher_soft_cap=7.0)[0]  # blocks of 5 positions: 13 = 5 + 5 + 3
    value, gradients = jax.value_and_grad(plain, argnums=(0, 1, 2, 3))(features, head, teacher_features, teacher_head)
    block_value, block_gradients = jax.jit(jax.value_and_grad(blockwise, argnums=(0, 1, 2, 3)))(
        features, head, teacher_features, teacher_head)
    assert abs(float(block_value) - float(value)) < 1e-5 * float(value)
    for name, actual, expected in zip(("features", "head"), block_gradients[:2], gradients[:2]):
        assert np.abs(expected).max() > 0, name
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=name)
    assert not np.any(block_gradients[2]) and not np.any(block_gradients[3])  # the teacher is frozen
    assert not np.any(gradients[2]) and not np.any(gradients[3])
