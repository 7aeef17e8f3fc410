"""Text in, text out: prompts continued by a trained model (the end-of-run sample, `seqmix generate`)."""

from __future__ import annotations

import sys

import jax
import numpy as np

from seqmix.models.generate import generate


def sample_text(model, tokenizer, prompts: list[str], max_new_tokens: int, *, rng: jax.Array, context_len: int,
                temperature: float = 0.8, top_p: float = 0.95) -> list[str]:
    """Each prompt with its continuation of max_new_tokens tokens, generated together in one batch
    (`seqmix.models.generate`) from the key `rng`. context_len: the sequence length the model was
    trained on; a note goes to stderr when a prompt and its continuation run past it."""
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    longest = max(len(tokens) for tokens in encoded) + max_new_tokens
    if longest > context_len:
        print(f"note: {longest} tokens exceed the {context_len}-token "
              "context the model was trained on; expect quality to drop past it", file=sys.stderr)
    new_tokens = generate(model, encoded, max_new_tokens, rng=rng, temperature=temperature, top_p=top_p)
    return [tokenizer.decode(np.concatenate([np.asarray(tokens, np.int32), row]))
            for tokens, row in zip(encoded, np.asarray(new_tokens))]
