"""Helpers shared by the kernel families' tests."""

import jax.numpy as jnp
import numpy as np


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def packed_segments(rng, batch, length):
    """Rows of several segments with padding between and after them (ids restart per row)."""
    rows = []
    for _ in range(batch):
        ids, segment = [], 0
        while len(ids) < length:
            segment += 1
            ids += [segment] * int(rng.integers(3, 20)) + [0] * int(rng.integers(0, 3))
        rows.append(ids[:length])
    return jnp.asarray(rows, jnp.int32)
