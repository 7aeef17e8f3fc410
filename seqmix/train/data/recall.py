"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): a synthetic task that
asks a sequence model to store key-value pairs and recall them later, the ability that separates
attention from fixed-size recurrent states.

A row of `seq_len` tokens opens with `num_pairs` pairs `k_1 v_1 ... k_n v_n` (distinct keys from
the lower half of the vocabulary, values from the upper half, token 0 never used), and then hides
each key once more, in random order, among the padding zeros of the rest, followed by its value:

    k3 v3 k1 v1 k2 v2 | 0 0 k1 v1 0 k3 v3 0 0 k2 v2 0 ...

The model is scored only where a key recurs: its prediction of the next token must be the value.
"""

from __future__ import annotations

import numpy as np


def mqar_batch(rng: np.random.Generator, batch: int, seq_len: int, num_pairs: int, vocab_size: int,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of MQAR rows: (inputs [B, T] int32, targets [B, T] int32 (the next token's
    expected value), scored [B, T] bool (True exactly at the recurring keys, num_pairs per row))."""
    half = vocab_size // 2
    if num_pairs < 1 or num_pairs > half - 1:
        raise ValueError(f"num_pairs must be in [1, {half - 1}] for vocab_size {vocab_size}, got {num_pairs}")
    query_slots = (seq_len - 2 * num_pairs) // 2
    if query_slots < num_pairs:
        raise ValueError(f"seq_len {seq_len} cannot hold {num_pairs} pairs and their queries (needs >= {4 * num_pairs})")
    keys = np.argsort(rng.random((batch, half - 1)), axis=1)[:, :num_pairs] + 1  # distinct, in [1, half)
    values = rng.integers(half, vocab_size, (batch, num_pairs))
    inputs = np.zeros((batch, seq_len), np.int32)
    targets = np.zeros((batch, seq_len), np.int32)
    scored = np.zeros((batch, seq_len), bool)
    inputs[:, 0:2 * num_pairs:2], inputs[:, 1:2 * num_pairs:2] = keys, values
    # Each key recurs once, in a random two-token slot of the query section, in a random order.
    slots = np.argsort(rng.random((batch, query_slots)), axis=1)[:, :num_pairs]
    at = 2 * num_pairs + 2 * slots
    rows = np.arange(batch)[:, None]
    inputs[rows, at], inputs[rows, at + 1] = keys, values
    targets[rows, at] = values
    scored[rows, at] = True
    return inputs, targets, scored
