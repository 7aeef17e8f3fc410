"""Instruction data in the Alpaca JSON format, trained with the loss on the response only.

A file holds a JSON list of records {"instruction", "input" (may be empty), "output"}. Each
becomes an `Instruction`: the prompt (Alpaca's template around instruction and input) and the
response (the output). Its tokens are the prompt's then the response's; only targets inside the
response are scored (`document_tokens`), so the model learns to answer, not to write prompts.
"""

from __future__ import annotations

import dataclasses
import glob
import json

import numpy as np

from seqmix.train.data.errors import DataError
from seqmix.train.data.tokenizer import Tokenizer

PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclasses.dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str


def alpaca_prompt(instruction: str, context: str) -> str:
    """Alpaca's prompt for an instruction and its (possibly empty) input."""
    if context:
        return PROMPT.format(with_input=", paired with an input that provides further context",
                             instruction=instruction, input_block=f"### Input:\n{context}\n\n")
    return PROMPT.format(with_input="", instruction=instruction, input_block="")


def read_instructions(paths: list[str]) -> list[Instruction]:
    """The records of every Alpaca JSON file `paths` names (globs allowed), in order; a malformed
    file or record raises DataError naming the file and the record's index."""
    examples = []
    for pattern in paths:
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise DataError(f"{pattern}: matches no file")
        for file in files:
            try:
                records = json.loads(open(file, encoding="utf-8").read())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"{file}: not a readable JSON file ({err})") from err
            if not isinstance(records, list) or not records:
                raise DataError(f"{file}: expected a non-empty JSON list of Alpaca records")
            for index, record in enumerate(records):
                fields = {key: record.get(key, "") if isinstance(record, dict) else None
                          for key in ("instruction", "input", "output")}
                bad = [key for key, value in fields.items() if not isinstance(value, str)]
                if bad or not fields["instruction"] or not fields["output"]:
                    key = bad[0] if bad else ("instruction" if not fields["instruction"] else "output")
                    raise DataError(f"{file}: record {index}: {key!r} must be a non-empty string "
                                    "(input may be empty)")
                examples.append(Instruction(alpaca_prompt(fields["instruction"], fields["input"]), fields["output"]))
    return examples


def document_tokens(document: str | Instruction, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] int32, trained [n] bool): trained[i] says whether token i is a target the loss
    scores: every token of plain text, the response's tokens of an instruction."""
    if isinstance(document, Instruction):
        prompt, response = tokenizer.encode(document.prompt), tokenizer.encode(document.response)
        tokens = np.concatenate([prompt, response])
        return tokens.astype(np.int32), np.arange(len(tokens)) >= len(prompt)
    tokens = tokenizer.encode(document).astype(np.int32)
    return tokens, np.ones(len(tokens), bool)
