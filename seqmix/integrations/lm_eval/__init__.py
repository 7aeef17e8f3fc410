"""lm-evaluation-harness adapter: model type `seqmix` (`pip install 'seqmix[lm_eval]'`).

Importing this module registers the model with lm-eval, so that

    import lm_eval, seqmix.integrations.lm_eval
    lm_eval.simple_evaluate("seqmix", model_args="pretrained=DIR", tasks=[...])

or, from the shell, `python -m seqmix.integrations.lm_eval --model seqmix --model_args pretrained=DIR
--tasks ...` (lm-eval's own command line, with the model registered first) evaluate a seqmix model.

`pretrained=DIR` is either a model directory (`seqmix export`, a Hugging Face checkpoint: loaded
by `seqmix.from_pretrained`, with the directory's tokenizer.json or else the byte tokenizer), or a
run directory of `seqmix train | linearize` (the parameters of its newest checkpoint, by
`seqmix.load_run`, and its run's tokenizer). Other model_args: `tokenizer=PATH|byte` (overrides the one found),
`batch_size` (rows per forward, default 16), `max_length` (tokens of context per prediction,
default none: recurrent models read any length), `max_gen_toks` (default 256), `prefix_token`
(a token id put before an empty context, as a Hugging Face model's BOS; default none), `dtype`
(of a model directory's parameters), `seed` (for sampled generation).

Scoring follows `seqmix eval --choices` (`seqmix.train.multiple_choice`): the context and the
continuation are tokenized separately and concatenated, and a continuation's log-likelihood is the
sum of its tokens' log-probabilities after the context, so this adapter and `seqmix eval` give the
same numbers on the same examples. seqmix models have no BOS token: without `prefix_token`, the
first token of an empty context (and of a `loglikelihood_rolling` document) has nothing to be
predicted from and is not scored. `generate_until` generates with `seqmix.models.generate`
(greedy unless the task sets do_sample) and cuts the text at the first `until` string.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from seqmix.configuration import ConfigError
from seqmix.models.generate import generate
from seqmix.train.multiple_choice import continuation_scores

log = logging.getLogger(__name__)

def load_model(pretrained: str | Path, tokenizer: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) of a run directory or a model directory; `tokenizer` ("byte" or the
    path of a tokenizer.json) overrides the one found there."""
    from seqmix.train.data.tokenizer import ByteTokenizer, load_tokenizer

    path = Path(pretrained)
    run_dir = path.parent if path.name == "checkpoints" else path
    if (run_dir / "config.yaml").is_file():
        from seqmix.train.config import load_train_config
        from seqmix.train.run_loader import load_run

        if load_train_config(run_dir / "config.yaml").objective == "mlm":
            raise ConfigError(f"{pretrained}: trained with objective mlm, an encoder that fills in masked tokens; "
                              "lm-eval's requests need a left-to-right model")
        model, config = load_run(run_dir)
        found = load_tokenizer(config.data.tokenizer)
    elif (path / "config.json").is_file():
        from seqmix.models.hf import from_pretrained

        model = from_pretrained(path, dtype=jnp.dtype(dtype))
        found = load_tokenizer(str(path / "tokenizer.json")) if (path / "tokenizer.json").is_file() else ByteTokenizer()
    else:
        raise ConfigError(f"pretrained={pretrained}: neither a seqmix run directory (config.yaml) nor a model "
                          "directory (config.json)")
    chosen = load_tokenizer(str(tokenizer)) if tokenizer else found
    vocab = model.embed_tokens.embedding.shape[0]
    if chosen.vocab_size > vocab:
        raise ConfigError(f"pretrained={pretrained}: the tokenizer has {chosen.vocab_size} tokens, more than the "
                          f"model's {vocab} embeddings")
    return model, chosen


def _batch_size(value) -> int:
    """lm-eval's batch_size: an int, its string, or "auto[:N]" (taken as the default, 16)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 16
    size = int(value)
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {value!r}")
    return size


@register_model("seqmix")
class SeqmixLM(LM):
    """A seqmix model as an lm-eval `LM`: from `pretrained` (a directory), or from an already
    built `model` and `tokenizer` (library use: pass the instance to `lm_eval.simple_evaluate`)."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size=16,
                 max_length: int | None = None, max_gen_toks: int = 256, prefix_token: int | None = None,
                 dtype: str = "float32", seed: int = 0, max_batch_size=None, device=None):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ConfigError("seqmix lm-eval model: give either pretrained=DIR or a built model (and tokenizer)")
        if model is None:
            model, tokenizer = load_model(pretrained, tokenizer, dtype)
        elif tokenizer is None or isinstance(tokenizer, str):
            from seqmix.train.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or "byte")
        if device not in (None, "cpu", "cuda", "tpu") and not str(device).startswith(("cuda:", "gpu")):
            log.warning("seqmix: device=%s is ignored; JAX places the model on its default device", device)
        self.model, self.tokenizer = model, tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else type(model).__name__
        self.batch_size = _batch_size(batch_size)
        self.max_length = None if max_length in (None, "", 0) else int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_token = None if prefix_token in (None, "") else int(prefix_token)
        self.rng = jax.random.key(int(seed))
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be at least 1, got {max_length!r}")
        self._warned_unscored = False

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "path", "byte")

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), np.int32)

    def _context(self, text: str) -> np.ndarray:
        ids = self._encode(text)
        if len(ids) == 0 and self.prefix_token is not None:
            return np.array([self.prefix_token], np.int32)
        if len(ids) == 0 and not self._warned_unscored:
            log.warning("seqmix: an empty context and no prefix_token: the first token of the continuation is "
                        "not scored (seqmix models have no BOS token; pass prefix_token=ID to give one)")
            self._warned_unscored = True
        return ids

    # -- log-likelihoods --------------------------------------------------------------------------

    def score(self, pairs: list[tuple[np.ndarray, np.ndarray]], *, disable_tqdm: bool = True
              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) of each pair of token arrays, in batches of
        rows sorted by length, by `continuation_scores`. A row is context + continuation, cut from
        the left to max_length + 1 tokens where max_length is set."""
        rows, starts = [], []
        for context, continuation in pairs:
            row = np.concatenate([context, continuation]).astype(np.int32)
            start = max(len(context), 1) - 1  # the position whose next token is the first one scored
            if self.max_length is not None and len(row) > self.max_length + 1:
                cut = len(row) - self.max_length - 1
                row, start = row[cut:], max(start - cut, 0)
            rows.append(row)
            starts.append(start)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted((i for i in range(len(rows)) if len(rows[i]) > 1), key=lambda i: -len(rows[i]))
        batches = [order[b:b + self.batch_size] for b in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="seqmix scoring", disable=disable_tqdm):
            height = min(self.batch_size, 1 << (len(batch) - 1).bit_length())  # powers of two: fewer shapes
            log_likelihoods, greedy = continuation_scores(self.model, [rows[i] for i in batch],
                                                          [starts[i] for i in batch], height=height)
            for r, i in enumerate(batch):
                results[i] = (float(log_likelihoods[r]), bool(greedy[r]))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(self._context(context), self._encode(continuation)) for context, continuation in
                 (request.args for request in requests)]
        results = self.score(pairs, disable_tqdm=disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (context, continuation) pairs that score every token of `text` once (each but the
        first, without prefix_token), with at most max_length tokens of context per prediction."""
        tokens = [int(t) for t in self._encode(text)]
        if self.prefix_token is not None:
            prefix, predicted = self.prefix_token, tokens
        elif len(tokens) < 2:
            return []
        else:
            prefix, predicted = tokens[0], tokens[1:]
        if not predicted:
            return []
        windows = get_rolling_token_windows(predicted, prefix, self.max_length or len(predicted), 1)
        return [tuple(np.asarray(part, np.int32) for part in make_disjoint_window(window)) for window in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = [self.rolling_windows(request.args[0]) for request in requests]
        scores = iter(self.score([pair for doc in windows for pair in doc], disable_tqdm=disable_tqdm))
        results = []
        for request, doc in zip(requests, windows):
            results.append(float(sum(next(scores)[0] for _ in doc)))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    # -- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, by `seqmix.models.generate` in batches of requests with
        the same generation arguments, cut before the first of their `until` strings."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            options = dict(requests[indices[0]].args[1])
            until = options.pop("until", None) or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            new_tokens = int(options.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 1.0 if sample else 0.0))
            top_p = float(options.pop("top_p", 1.0))
            if not sample:
                temperature = 0.0
            if options:
                log.warning("seqmix: generation arguments %s are not supported and are ignored", sorted(options))
            prompts = []
            for i in indices:
                prompt = self._context(requests[i].args[0])
                if len(prompt) == 0:
                    raise ConfigError("generate_until: an empty context gives generation nothing to continue; "
                                      "pass prefix_token=ID")
                prompts.append(prompt[-self.max_length:] if self.max_length else prompt)
            order = sorted(range(len(indices)), key=lambda k: -len(prompts[k]))
            for start in tqdm(range(0, len(order), self.batch_size), desc="seqmix generating", disable=disable_tqdm):
                batch = order[start:start + self.batch_size]
                self.rng, key = jax.random.split(self.rng)
                tokens = np.asarray(generate(self.model, [prompts[k] for k in batch], new_tokens, rng=key,
                                             temperature=temperature, top_p=top_p))
                for row, k in zip(tokens, batch):
                    text = self.tokenizer.decode(row)
                    cut = min((text.find(s) for s in until if s in text), default=len(text))
                    results[indices[k]] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[indices[k]].args, results[indices[k]])
        return results
