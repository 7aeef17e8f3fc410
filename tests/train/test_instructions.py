"""Alpaca instruction data: the prompt template, errors that name the file and record, and packed
rows whose loss mask scores exactly the response tokens, through to the train step's loss."""

import json

import numpy as np
import pytest

from seqmix.train.data import ByteTokenizer, DataError, make_dataset
from seqmix.train.data.instructions import alpaca_prompt, read_instructions

RECORDS = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
           {"instruction": "Say hello in French.", "output": "Bonjour, le monde entier!"}]  # no input key


def write(tmp_path, records, name="alpaca.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_records_become_alpaca_prompts_and_responses(tmp_path):
    examples = read_instructions([write(tmp_path, RECORDS)])
    assert [e.response for e in examples] == ["Blue.", "5", "Bonjour, le monde entier!"]
    assert examples[0].prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:\n2 and 3\n\n### Response:\n" in examples[1].prompt
    assert examples[1].prompt == alpaca_prompt("Add the numbers.", "2 and 3")
    assert "paired with an input" in examples[1].prompt and "paired with an input" not in examples[0].prompt


@pytest.mark.parametrize("records, message", [
    ({"instruction": "x"}, "expected a non-empty JSON list"),
    ([RECORDS[0], {"instruction": "x", "output": ""}], r"record 1: 'output' must be a non-empty string"),
    ([{"instruction": 3, "output": "y"}], r"record 0: 'instruction' must be a non-empty string"),
])
def test_malformed_files_name_the_record(tmp_path, records, message):
    with pytest.raises(DataError, match=message):
        read_instructions([write(tmp_path, records)])
    with pytest.raises(DataError, match="matches no file"):
        read_instructions([str(tmp_path / "none*.json")])


def test_only_response_targets_are_scored_in_packed_rows(tmp_path):
    examples = read_instructions([write(tmp_path, RECORDS)])
    batches = list(make_dataset(examples, ByteTokenizer(), seq_len=256, batch_size=1, seed=0, shuffle=False,
                                repeat=False))
    scored_text = []
    for batch in batches:
        targets, mask, segments = batch["targets"][0], batch["loss_mask"][0], batch["segment_ids"][0]
        for segment in sorted(set(segments.tolist()) - {0}):
            picked = targets[(segments == segment) & (mask == 1)]
            scored_text.append(bytes(picked.astype(np.uint8)).decode())
        assert not mask[segments == 0].any()
    assert sorted(scored_text) == sorted(record["output"] for record in RECORDS)


def test_the_train_loss_counts_the_response_tokens_only(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from seqmix.configuration import build
    from seqmix.models.config import ModelConfig
    from seqmix.models.lm import LanguageModel
    from seqmix.train.step import _batch_loss

    examples = read_instructions([write(tmp_path, RECORDS)])
    batches = list(make_dataset(examples, ByteTokenizer(), seq_len=512, batch_size=1, seed=0, shuffle=False,
                                repeat=False))
    model = LanguageModel(build(ModelConfig, {"d_model": 16, "n_layers": 1, "n_heads": 2}, "model"), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    count = lambda batch: int(_batch_loss(graphdef, params, rest, {k: jnp.asarray(v) for k, v in batch.items()},
                                          None)[1][1])
    assert sum(count(batch) for batch in batches) == sum(len(record["output"]) for record in RECORDS) == 31
    without_mask = [{k: v for k, v in batch.items() if k != "loss_mask"} for batch in batches]
    assert sum(count(batch) for batch in without_mask) > 300  # the prompts too
