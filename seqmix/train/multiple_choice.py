"""Log-likelihood multiple-choice evaluation on local JSON-lines tasks, in the form PiQA, ARC and
HellaSwag reduce to: one object per line with `context` (str), `choices` (list of str) and `gold`
(index of the right choice). A choice's score is the summed log-probability of its tokens after
the context; `acc` picks the highest score, `acc_norm` the highest per byte of the choice (as
lm-evaluation-harness does, so long choices are not penalised for their length).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.train.data.errors import DataError
from seqmix.train.loss import target_log_probs


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
    context: str
    choices: tuple[str, ...]
    gold: int


def load_choice_tasks(path: str | Path) -> list[ChoiceExample]:
    """The examples of a JSON-lines file; a malformed line is refused with its file and line."""
    examples = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such task file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSON-lines task file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with context, choices and gold, got {type(record).__name__}")
        context, choices, gold = (record.get(key) for key in ("context", "choices", "gold"))
        if not isinstance(context, str):
            raise DataError(f"{where}: 'context' must be a string, got {context!r}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: 'gold' must be an index into the {len(choices)} choices, got {gold!r}")
        examples.append(ChoiceExample(context, tuple(choices), gold))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


BUCKET = 64  # rows are padded to a multiple of this many tokens: fewer shapes, fewer compilations


def choice_log_likelihoods(model, tokenizer, context: str, choices: tuple[str, ...]) -> np.ndarray:
    """[C] float64: log p(choice tokens | context tokens) under `model` (tokens [B, T] -> logits),
    the choices scored as one batch (`continuation_scores`). The context keeps at least one token,
    so the first choice token is predicted."""
    context_ids = tokenizer.encode(context)
    rows = [np.concatenate([context_ids, tokenizer.encode(choice)]) for choice in choices]
    log_likelihoods, _greedy = continuation_scores(model, rows, [max(len(context_ids), 1) - 1] * len(rows))
    return log_likelihoods


def continuation_scores(model, rows: list[np.ndarray], starts: list[int], *, height: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Scores the continuation that ends each row: rows[i] (int tokens, at least 2) is a context then
    its continuation, and starts[i] the position whose next token is the continuation's first
    (len(context) - 1, at least 0). Returns ([N] float64: the summed log p(token t + 1 | tokens <= t)
    over the continuation, [N] bool: whether each of its tokens is the argmax). The rows run as one
    right-padded batch [height (default N), T rounded up to BUCKET] int32."""
    length = -(-max(len(row) for row in rows) // BUCKET) * BUCKET
    tokens = np.zeros((height or len(rows), length), np.int32)
    scored = np.zeros((height or len(rows), length), bool)  # scored[t]: token t + 1 belongs to the continuation
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = row
        scored[i, start:len(row) - 1] = True
    log_likelihoods, greedy = jax.device_get(_score_rows(model, jnp.asarray(tokens), jnp.asarray(scored)))
    return np.asarray(log_likelihoods[:len(rows)], np.float64), np.asarray(greedy[:len(rows)], bool)


@nnx.jit
def _score_rows(model, tokens, scored):
    """Per row of tokens [B, T]: the summed log p(token t + 1 | tokens <= t) over the positions t
    where scored [B, T] is true ([B] float32), and whether each of those tokens is the argmax ([B] bool)."""
    logits = model(tokens)[:, :-1]
    targets, mask = tokens[:, 1:], scored[:, :-1]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return (jnp.sum(jnp.where(mask, target_log_probs(logits, targets), 0.0), axis=-1),
            jnp.all(greedy | ~mask, axis=-1))


def evaluate_choices(model, tokenizer, examples: list[ChoiceExample]) -> dict[str, float]:
    """{"acc", "acc_norm", "examples"} of `model` on the examples."""
    hits = hits_norm = 0
    for example in examples:
        scores = choice_log_likelihoods(model, tokenizer, example.context, example.choices)
        lengths = np.array([len(choice.encode("utf-8")) for choice in example.choices])
        hits += int(np.argmax(scores) == example.gold)
        hits_norm += int(np.argmax(scores / lengths) == example.gold)
    return {"acc": hits / len(examples), "acc_norm": hits_norm / len(examples), "examples": len(examples)}
