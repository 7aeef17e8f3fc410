"""The generation-based evaluations (`seqmix eval --agreement`, `--needle`): agreement counts
identical continuations and common prefixes, a model agrees with itself and less with another, and
the pass-key prompts hide the key where they say and are scored by what the model repeats."""

import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.agreement import agreement, greedy_continuations, held_out_prompts
from seqmix.train.data import DataError
from seqmix.train.data.tokenizer import ByteTokenizer
from seqmix.train.needle import NEEDLE, QUESTION, needle_accuracy, needle_prompt

TOKENIZER = ByteTokenizer()
TEXT = TOKENIZER.encode("Now is the winter of our discontent made glorious summer by this sun of York. " * 20)


def test_agreement_counts_identical_continuations_and_common_prefixes():
    result = agreement(np.array([[1, 2, 3], [1, 2, 3], [7, 8, 9]]), np.array([[1, 2, 3], [1, 5, 3], [0, 8, 9]]))
    assert (result.exact, result.common_prefix, result.tokens, result.prompts) == (1 / 3, 4 / 3, 3, 3)


def test_a_model_agrees_with_itself_and_less_with_another():
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "init_std": 0.5},
                   "model")
    model, other = (LanguageModel(config, rngs=nnx.Rngs(seed)) for seed in (0, 1))
    prompts = held_out_prompts(TEXT, 5, 16)
    assert [len(p) for p in prompts] == [16] * 5 and np.array_equal(prompts[0], TEXT[:16])
    mine = greedy_continuations(model, prompts, 8, batch=2)
    assert agreement(mine, greedy_continuations(model, prompts, 8)) == agreement(mine, mine)
    assert agreement(mine, mine).common_prefix == 8
    assert agreement(mine, greedy_continuations(other, prompts, 8)).common_prefix < 4
    with pytest.raises(DataError, match="fewer than the 1616 that 100 prompts of 16 tokens need"):
        held_out_prompts(TEXT[:1000], 100, 16)


def test_the_needle_sits_at_its_depth_and_the_question_ends_the_prompt():
    prompt = needle_prompt(TEXT, TOKENIZER, 300, 0.25, "48213")
    needle, question = NEEDLE.format(key="48213"), QUESTION
    room = 300 - len(needle) - len(question)
    assert len(prompt) == 300
    text = TOKENIZER.decode(prompt)
    assert text.index(needle) == round(0.25 * room) and text.endswith(question)
    assert TOKENIZER.decode(prompt[:round(0.25 * room)]) == TOKENIZER.decode(TEXT[:round(0.25 * room)])
    with pytest.raises(DataError, match="the length is too short"):
        needle_prompt(TEXT, TOKENIZER, 40, 0.5, "48213")


def test_needle_accuracy_scores_what_the_model_repeats():
    def reads_the_key(prompts, n):  # an oracle that finds the key in its prompt
        keys = [TOKENIZER.decode(p).split("The pass key is ")[1][:5] for p in prompts]
        return np.stack([TOKENIZER.encode(f" {key}." + " " * n)[:n] for key in keys])

    assert needle_accuracy(reads_the_key, TOKENIZER, TEXT, [200, 400], trials=5) == {200: 1.0, 400: 1.0}
    guesses = lambda prompts, n: np.stack([TOKENIZER.encode(" 00000." + " " * n)[:n]] * len(prompts))
    assert needle_accuracy(guesses, TOKENIZER, TEXT, [200], trials=5) == {200: 0.0}
