"""The multiple-choice evaluator against per-choice log-likelihoods computed one unpadded row at
a time, on a small random model; its accuracy on golds set to known answers; malformed files."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.data.errors import DataError
from seqmix.train.data.tokenizer import ByteTokenizer
from seqmix.train.multiple_choice import choice_log_likelihoods, evaluate_choices, load_choice_tasks

TOKENIZER = ByteTokenizer()


def model():
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.3,
                                 "layer_pattern": ["gla", "attention"]}, "model")
    return LanguageModel(config, rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, ids: model(ids))


def one_row_log_likelihood(model, context, choice):
    ids = np.concatenate([TOKENIZER.encode(context), TOKENIZER.encode(choice)])
    log_probs = np.asarray(jax.nn.log_softmax(forward(model, ids[None])[0], axis=-1), np.float64)
    start = len(TOKENIZER.encode(context))
    return sum(log_probs[t - 1, ids[t]] for t in range(start, len(ids)))


EXAMPLES = [("The cat sat on the", ["mat.", "moon, far away.", "x"]), ("To be or not", [" to be", "!"]),
            ("Q: 2+2? A:", [" 4", " four", " 5"])]


def test_log_likelihoods_equal_one_row_at_a_time():
    lm = model()
    for context, choices in EXAMPLES:
        got = choice_log_likelihoods(lm, TOKENIZER, context, tuple(choices))
        expected = [one_row_log_likelihood(lm, context, choice) for choice in choices]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_accuracy_counts_the_examples_whose_gold_scores_highest(tmp_path):
    lm = model()
    lines = []
    for index, (context, choices) in enumerate(EXAMPLES):
        scores = [one_row_log_likelihood(lm, context, choice) for choice in choices]
        best = int(np.argmax(scores))
        gold = best if index != 1 else (best + 1) % len(choices)  # one example the model gets wrong
        lines.append(json.dumps({"context": context, "choices": choices, "gold": gold}))
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = evaluate_choices(lm, TOKENIZER, load_choice_tasks(path))
    assert result["examples"] == 3
    assert result["acc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("line, message", [
    ("{not json", "task.jsonl:2: not JSON"),
    (json.dumps({"context": "a", "choices": ["b"], "gold": 0}), "task.jsonl:2: 'choices' must be a list of at least 2"),
    (json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}), "task.jsonl:2: 'gold' must be an index"),
    (json.dumps({"choices": ["b", "c"], "gold": 0}), "task.jsonl:2: 'context' must be a string"),
    (json.dumps(["a", ["b", "c"], 0]), "task.jsonl:2: expected an object with context, choices and gold, got list"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "ok", "choices": ["a", "b"], "gold": 1}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_choice_tasks(path)


def test_a_task_file_that_is_missing_a_directory_or_not_utf8_is_named(tmp_path):
    with pytest.raises(DataError, match="none.jsonl: no such task file"):
        load_choice_tasks(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="is a directory, not a JSON-lines task file"):
        load_choice_tasks(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes('{"context": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text \(byte 16: invalid continuation byte\)"):
        load_choice_tasks(tmp_path / "latin1.jsonl")
