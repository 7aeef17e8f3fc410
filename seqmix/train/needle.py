"""Needle in a haystack: pass-key retrieval at several context lengths (Mohtashami and Jaggi 2023,
"Landmark Attention"; the test linearization papers use to show what a fixed-size state forgets).

Each trial hides a random 5-digit pass key in held-out text at a random depth, fills the context to
`length` tokens, and asks for the key at the end; the model continues greedily and is right when its
continuation begins with the key. The accuracy per length shows where retrieval fails.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from seqmix.train.data.errors import DataError

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


def needle_prompt(filler: np.ndarray, tokenizer, length: int, depth: float, key: str) -> np.ndarray:
    """[length] int32: held-out tokens `filler` cut to fit, the needle (with `key`) inserted after
    a `depth` (0..1) share of them, and the question at the end."""
    needle, question = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)
    room = length - len(needle) - len(question)
    if room < 0 or len(filler) < room:
        raise DataError(f"a {length}-token needle prompt needs {max(room, 0)} tokens of held-out text around the "
                        f"{len(needle) + len(question)} of the needle and question; "
                        f"{'the text has ' + str(len(filler)) if room >= 0 else 'the length is too short'}")
    split = int(round(depth * room))
    return np.concatenate([filler[:split], needle, filler[split:room], question]).astype(np.int32)


def needle_accuracy(continue_greedily: Callable[[list[np.ndarray], int], np.ndarray], tokenizer,
                    filler: np.ndarray, lengths: list[int], *, trials: int = 20, seed: int = 0) -> dict[int, float]:
    """{length: share of trials whose key the model repeats}. continue_greedily(prompts, n) -> [N, n]
    tokens (a model's greedy continuations); each length gets `trials` random keys and depths, the
    filler taken from a random offset of `filler` (held-out tokens)."""
    rng = np.random.default_rng(seed)
    accuracy = {}
    for length in lengths:
        keys = [str(k) for k in rng.integers(10000, 100000, trials)]
        room = length - len(tokenizer.encode(NEEDLE.format(key=keys[0]))) - len(tokenizer.encode(QUESTION))
        offsets = rng.integers(0, max(1, len(filler) - room), trials)
        prompts = [needle_prompt(filler[offset:], tokenizer, length, depth, key)
                   for key, offset, depth in zip(keys, offsets, rng.uniform(0, 1, trials))]
        answer_tokens = max(len(tokenizer.encode(" " + key)) for key in keys) + 1
        continuations = continue_greedily(prompts, answer_tokens)
        accuracy[length] = float(np.mean([tokenizer.decode(row).strip().startswith(key)
                                          for row, key in zip(continuations, keys)]))
    return accuracy
