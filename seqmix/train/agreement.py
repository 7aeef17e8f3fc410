"""Generation agreement of a model with a reference (a linearized student with its teacher): both
continue the same held-out prompts greedily, and the continuations are compared token by token.

Log-likelihood scores overstate how much of a teacher a student keeps: a student can assign the
teacher's text nearly the teacher's probability and still drift away from it once it generates
(one study of linearized 7B models found 0.2 points lost under log-likelihood and 20.8 when the
model had to generate). Agreement measures the second: the share of prompts whose first `tokens`
continuation tokens are identical, and the mean length of the common prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from seqmix.models.generate import generate
from seqmix.train.data.errors import DataError


def held_out_prompts(text: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """`count` prompts of `length` tokens [length] int32: pieces of the held-out tokens `text`
    starting at evenly spaced offsets, each followed by at least `length` more tokens of it."""
    if len(text) < count * length + length:
        raise DataError(f"the held-out text has {len(text)} tokens, fewer than the {count * length + length} that "
                        f"{count} prompts of {length} tokens need")
    starts = np.linspace(0, len(text) - 2 * length, count).astype(int)
    return [text[start:start + length] for start in starts]


def greedy_continuations(model, prompts: list[np.ndarray], tokens: int, batch: int = 16) -> np.ndarray:
    """[len(prompts), tokens] int32: each prompt's greedy continuation by `model`, in batches."""
    pieces = [np.asarray(generate(model, prompts[start:start + batch], tokens, rng=jax.random.key(0), temperature=0.0))
              for start in range(0, len(prompts), batch)]
    return np.concatenate(pieces)


@dataclasses.dataclass(frozen=True)
class Agreement:
    exact: float  # share of prompts whose continuations are identical over all their tokens
    common_prefix: float  # mean number of leading tokens the continuations share
    tokens: int  # continuation length compared
    prompts: int


def agreement(continuations: np.ndarray, reference: np.ndarray) -> Agreement:
    """The agreement of two sets of continuations [N, n] int (row i continues prompt i)."""
    same = np.asarray(continuations) == np.asarray(reference)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return Agreement(float(same.all(axis=1).mean()), float(prefix.mean()), same.shape[1], same.shape[0])
