"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, and a sample.

A run directory holds `config.yaml` (the resolved config), `run.lock` while a run trains in it
(`run_lock`), `checkpoints/` (orbax, written by
every process of a multi-process run; the other files by process 0 alone),
`metrics.jsonl` and, at the end, `loss.png`. `resume=True` continues from the newest complete
checkpoint with the same next batch; SIGTERM/SIGINT save a checkpoint before the loop exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from seqmix.configuration import ConfigError, build, to_dict
from seqmix.files import write_atomically
from seqmix.models.generate import generate
from seqmix.models.hf import teacher_of
from seqmix.train.attention_transfer import attention_transfer
from seqmix.train.checkpoint import Checkpointer, CheckpointsUnreadable
from seqmix.train.config import TrainConfig
from seqmix.train.data import DataError, unigram_entropy
from seqmix.train.evaluate import held_out_loss, to_global
from seqmix.train.inputs import Corpus, eval_iterator, held_out_tokens, load_corpus, train_iterator
from seqmix.train.metrics import MetricsLog, plot_loss, read_metrics
from seqmix.train.optim import make_schedule
from seqmix.train.run_lock import run_lock
from seqmix.train.sharding import batch_sharding, describe, make_mesh
from seqmix.train.state import TrainState, create_train_state
from seqmix.train.step import make_eval_step, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite losses)."""


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps completed
    losses: dict[int, float]  # training loss of each step this invocation ran
    eval_loss: float | None
    unigram_loss: float
    skipped_steps: int  # non-finite steps skipped in this invocation
    stop_signal: int | None  # SIGTERM/SIGINT that stopped the run (after saving a checkpoint)
    sample: str | None
    out_dir: Path


class _StopRequests:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint before exiting."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _first_difference(saved, current, path: str) -> tuple[str, object, object] | None:
    """(dotted key, saved value, current value) of the first difference of two plain-data configs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in [*saved, *(key for key in current if key not in saved)]:
            found = _first_difference(saved.get(key), current.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if saved == current else (path, saved, current)


def _check_resumable(saved: dict, config: TrainConfig, checkpoint_dir: Path) -> None:
    saved_config = build(TrainConfig, saved["config"])
    for section in ("model", "data"):
        found = _first_difference(to_dict(getattr(saved_config, section)), to_dict(getattr(config, section)), section)
        if found:
            key, before, now = found
            raise ConfigError(f"{key}: the checkpoints in {checkpoint_dir} were trained with {before!r}, this run "
                              f"has {now!r}; resume with the same {section} settings or choose another out_dir")


def _nonfinite_quantity(loss: float, grad_norm: float) -> str:
    """What made a skipped step non-finite: its loss, its gradients, or (both finite) the update."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm}, loss {loss:.4f})"
    return f"parameters after the update (loss {loss:.4f}, gradient norm {grad_norm:.3g}: is the learning rate too large?)"


class Trainer:
    """Builds everything a run needs from its config; `run()` trains to `config.steps`."""

    def __init__(self, config: TrainConfig, *, mesh: Mesh | None = None, corpus: Corpus | None = None):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        self.corpus = corpus if corpus is not None else load_corpus(config.data)
        if self.corpus.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.corpus.tokenizer.vocab_size} tokens ({config.data.tokenizer})"
            )
        self.train_state: TrainState = create_train_state(config, self.mesh)
        mlm = config.mlm if config.objective == "mlm" else None
        self.train_step = make_train_step(self.train_state, self.mesh, config.compute_dtype, config.loss_chunk_tokens,
                                          mlm=mlm, seed=config.seed)
        self.eval_step = make_eval_step(self.train_state, self.mesh, config.compute_dtype, config.loss_chunk_tokens,
                                        mlm=mlm)
        self.schedule = make_schedule(config.optim, config.steps)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
        )
        self.data = train_iterator(config.data, self.corpus, config.seed)
        self.rng = jax.random.key(config.seed)
        self.step = 0

    def restore_latest(self) -> None:
        """Loads the newest complete checkpoint of out_dir (state, data position, RNG), after
        checking that it was trained with this run's model and data settings."""
        saved = self.checkpointer.newest_metadata()
        if saved is not None:
            _check_resumable(saved, self.config, self.checkpointer.directory)
        try:
            restored = self.checkpointer.restore(self.train_state.abstract(), self.data)
        except CheckpointsUnreadable as err:
            raise ConfigError(f"out_dir: {err}") from None
        if restored is None:
            raise ConfigError(f"out_dir: no checkpoint to resume from in {self.checkpointer.directory}")
        step, state, metadata = restored
        _check_resumable(metadata, self.config, self.checkpointer.directory)  # an older one, if the newest failed
        self.train_state.state, self.step = state, step
        self.rng = jax.random.wrap_key_data(np.asarray(metadata["rng"], np.uint32))
        print(f"resumed from step {step} ({self.checkpointer.directory})", file=sys.stderr)

    def _save(self) -> None:
        """Checkpoints the current step (a no-op when this step is already saved)."""
        metadata = {
            "step": self.step,
            "config": to_dict(self.config),
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "mesh": dict(self.mesh.shape),
        }
        self.checkpointer.save(self.step, self.train_state.state, self.data, metadata)

    def _transfer_attention(self, log: MetricsLog) -> None:
        """LoLCATs' stage 1 on the run's own training batches, before the first step: the
        converted layers' transfer parameters learn the `init_from` checkpoint's attention."""
        settings = self.config.attention_transfer
        start = time.perf_counter()
        model, optimizer = nnx.merge(self.train_state.graphdef, self.train_state.state)
        teacher = teacher_of(model, self.config.init_from)  # the student's base arrays, already global and sharded
        batches = (to_global(next(self.data), batch_sharding(self.mesh)) for _ in range(settings.steps))
        losses = attention_transfer(teacher, model, batches, steps=settings.steps, lr=settings.lr)
        self.train_state.state = jax.device_put(nnx.state((model, optimizer)), self.train_state.shardings)
        log.write({"kind": "attention_transfer", "step": 0, "steps": settings.steps, "first_loss": losses[0],
                   "last_loss": losses[-1], "seconds": time.perf_counter() - start})
        print(f"attention transfer: {settings.steps} steps, relative error of the converted layers "
              f"{losses[0]:.4g} -> {losses[-1]:.4g}", file=sys.stderr)

    def _next_batch(self):
        micro_batches = [next(self.data) for _ in range(self.config.grad_accum)]
        stacked = {key: np.stack([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        return to_global(stacked, batch_sharding(self.mesh, leading_dims=1))

    def evaluate(self) -> dict[str, float] | None:
        if not self.corpus.eval_documents:
            return None
        return held_out_loss(
            self.eval_step, self.train_state.state, eval_iterator(self.config.data, self.corpus),
            batch_sharding(self.mesh), self.config.eval_batches,
        )

    def sample(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
               top_p: float = 0.95) -> list[str]:
        """Each prompt with its continuation, generated together in one batch."""
        encoded = [self.corpus.tokenizer.encode(prompt) for prompt in prompts]
        longest = max(len(tokens) for tokens in encoded) + max_new_tokens
        if longest > self.config.data.seq_len:
            print(f"note: {longest} tokens exceed the {self.config.data.seq_len}-token "
                  "context the model was trained on; expect quality to drop past it", file=sys.stderr)
        new_tokens = generate(self.train_state.model(), encoded, max_new_tokens,
                              rng=jax.random.fold_in(self.rng, self.step), temperature=temperature, top_p=top_p)
        return [self.corpus.tokenizer.decode(np.concatenate([np.asarray(tokens, np.int32), row]))
                for tokens, row in zip(encoded, np.asarray(new_tokens))]

    def run(self, *, resume: bool = False, until: int | None = None) -> TrainResult:
        """Trains from step 0 (or, with resume, from the newest checkpoint) to `until` (default
        config.steps; the schedule always spans config.steps), then saves, evaluates, samples."""
        config = self.config
        last_step = config.steps if until is None else min(until, config.steps)
        existing = self.checkpointer.latest_step()
        if existing is not None and not resume:
            raise ConfigError(
                f"out_dir: {self.out_dir} already holds checkpoints (latest step {existing}); "
                "pass --resume to continue that run or choose another out_dir"
            )
        if self.corpus.eval_documents and next(eval_iterator(config.data, self.corpus), None) is None:
            # Found now, not at the first evaluation after steps that no checkpoint holds yet.
            raise DataError(f"data.eval_files: the held-out documents ({len(held_out_tokens(self.corpus))} tokens) "
                            f"do not fill one batch of {config.data.batch_size} rows of {config.data.seq_len} "
                            "tokens; give more held-out text or a smaller data.batch_size or data.seq_len")
        if resume and existing is None and (self.out_dir / "metrics.jsonl").is_file() and read_metrics(self.out_dir / "metrics.jsonl"):
            raise ConfigError(f"--resume: {self.out_dir} holds the metrics of an earlier run but no checkpoint in "
                              f"{self.checkpointer.directory} (deleted?), so nothing to resume from; remove "
                              "metrics.jsonl to start afresh there, or choose another out_dir")
        if resume and existing is not None:
            self.restore_latest()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = jax.process_index() == 0  # of several processes, one writes the run's files
        if writer:
            write_atomically(self.out_dir, "config.yaml",
                             lambda file: Path(file).write_text(yaml.safe_dump(to_dict(config), sort_keys=False)))
        unigram = unigram_entropy(self.corpus.train_documents, self.corpus.tokenizer)
        log = MetricsLog(self.out_dir / "metrics.jsonl" if writer else None)
        print(
            f"seqmix: {jax.device_count()} device(s), mesh {describe(self.mesh)}, "
            f"{_count_params(self.train_state)/1e6:.2f}M parameters, unigram baseline {unigram:.3f} nats/token",
            file=sys.stderr,
        )
        if self.step == 0 and config.attention_transfer is not None:
            self._transfer_attention(log)
        losses, skipped, consecutive_bad, eval_loss = {}, 0, 0, None
        start_step = self.step
        tokens_since, time_since = 0.0, time.perf_counter()
        bar = tqdm(total=last_step, initial=self.step, disable=not sys.stderr.isatty(), unit="step")
        try:
            with _StopRequests() as stop:
                while self.step < last_step and stop.signal is None:
                    self.train_state.state, metrics = self.train_step(self.train_state.state, self._next_batch())
                    self.step += 1
                    loss, finite = float(metrics["loss"]), bool(metrics["finite"])
                    tokens_since += float(metrics["tokens"])
                    if not finite:
                        skipped, consecutive_bad = skipped + 1, consecutive_bad + 1
                        what = _nonfinite_quantity(loss, float(metrics["grad_norm"]))
                        log.write({"kind": "nonfinite", "step": self.step, "loss": loss, "what": what})
                        print(f"step {self.step}: non-finite {what}; update skipped", file=sys.stderr)
                        if consecutive_bad >= config.max_nonfinite_steps:
                            self.checkpointer.wait()
                            saved = self.checkpointer.latest_step()
                            last_good = ("no checkpoint was saved yet" if saved is None else
                                         f"the checkpoint of step {saved} in {self.checkpointer.directory} holds the "
                                         "last good state")
                            raise TrainingError(f"{consecutive_bad} consecutive non-finite steps (up to step "
                                                f"{self.step}, the last: non-finite {what}); stopping: {last_good}")
                        continue
                    consecutive_bad = 0
                    losses[self.step] = loss
                    if self.step % config.log_every == 0 or self.step == last_step:
                        elapsed = time.perf_counter() - time_since
                        record = {
                            "kind": "train", "step": self.step, "loss": loss,
                            "lr": float(self.schedule(self.step - 1)), "grad_norm": float(metrics["grad_norm"]),
                            "aux_loss": float(metrics["aux_loss"]), "tokens_per_s": tokens_since / max(elapsed, 1e-9),
                        }
                        log.write(record)
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                        if bar.disable:
                            print(f"step {self.step}/{config.steps} loss {loss:.4f} "
                                  f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s", file=sys.stderr)
                        tokens_since, time_since = 0.0, time.perf_counter()
                    bar.update(1)
                    if self.step % config.eval_every == 0 or self.step == last_step:
                        result = self.evaluate()
                        if result is not None:
                            eval_loss = result["eval_loss"]
                            log.write({"kind": "eval", "step": self.step, **result})
                            print(f"step {self.step}: held-out loss {eval_loss:.4f} "
                                  f"(perplexity {result['eval_ppl']:.2f})", file=sys.stderr)
                    if self.step % config.checkpoint.every_steps == 0:
                        self._save()
                stop_signal = stop.signal
            if self.step > start_step or stop_signal is not None:
                self._save()  # skipped by the checkpointer when the periodic save just wrote this step
            self.checkpointer.wait()
        finally:
            bar.close()
            log.close()
            self.checkpointer.close()
        if stop_signal is not None:
            print(f"stopped by signal {stop_signal} at step {self.step}; checkpoint saved in "
                  f"{self.checkpointer.directory}", file=sys.stderr)
        if writer:
            plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", baseline=unigram)
        sample = None
        # An MLM run's model is an encoder: it fills in masks, it does not continue text.
        if stop_signal is None and config.sample_tokens > 0 and config.objective == "next_token":
            sample = self.sample([config.sample_prompt], config.sample_tokens)[0]
        return TrainResult(self.step, losses, eval_loss, unigram, skipped, stop_signal, sample, self.out_dir)


def _count_params(train_state: TrainState) -> int:
    model_state = train_state.state[0]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model_state))


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Trains a model as `config` says, holding out_dir's lock throughout (`run_lock`: one
    trainer per run directory; of several processes, process 0 holds it); see `Trainer`."""
    owner = run_lock(Path(config.out_dir)) if jax.process_index() == 0 else contextlib.nullcontext()
    with owner:
        return Trainer(config).run(resume=resume)

