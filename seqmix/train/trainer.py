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
import sys
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from seqmix.configuration import ConfigError, build, first_difference, to_dict
from seqmix.files import write_atomically
from seqmix.layers.partitioning import using_rules
from seqmix.models.lora import merge_lora
from seqmix.train import distributed
from seqmix.train.checkpoint import Checkpointer, CheckpointsUnreadable
from seqmix.train.config import TrainConfig, stage_configs
from seqmix.train.data import DataError, unigram_entropy
from seqmix.train.distillation import load_teacher
from seqmix.train.evaluate import held_out_loss, to_global
from seqmix.train.inputs import Corpus, eval_iterator, held_out_tokens, load_corpus, train_iterator
from seqmix.train.metrics import MetricsLog, plot_loss, read_metrics
from seqmix.train.optim import make_schedule
from seqmix.train.progress import Progress
from seqmix.train.run_lock import run_lock
from seqmix.train.sampling import sample_text
from seqmix.train.sharding import batch_sharding, describe, make_mesh
from seqmix.train.state import TrainState, create_train_state
from seqmix.train.step import make_eval_step, make_train_step
from seqmix.train.stop_requests import StopRequests


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


def _check_resumable(saved: dict, config: TrainConfig, checkpoint_dir: Path) -> None:
    saved_config = build(TrainConfig, saved["config"])
    for section in ("model", "data"):
        found = first_difference(to_dict(getattr(saved_config, section)), to_dict(getattr(config, section)), section)
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

    def __init__(self, config: TrainConfig, *, mesh: Mesh | None = None, corpus: Corpus | None = None,
                 weights: nnx.State | None = None):
        """weights: the model's starting parameters instead of init_from's (a staged run's stage
        before; see `state.create_train_state`)."""
        distributed.check_same_config(to_dict(config))  # of several processes: before their first collective
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        self.corpus = corpus if corpus is not None else load_corpus(config.data)
        if self.corpus.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.corpus.tokenizer.vocab_size} tokens ({config.data.tokenizer})"
            )
        self.train_state: TrainState = create_train_state(config, self.mesh, weights)
        if config.distill is not None and not jax.tree.leaves(nnx.state(self.train_state.model(),
                                                                        self.train_state.trainable)):
            raise ConfigError(f"distill.train: {config.distill.train!r} selects no parameter of the model (the Liger "
                              "conversions add none; train: new trains what a conversion added)")
        mlm = config.mlm if config.objective == "mlm" else None
        teacher = None
        if config.distill is not None:  # a frozen copy: the student's own base weights may train
            teacher = load_teacher(config.distill.teacher or config.init_from, config.distill, config.model, self.mesh)
        self.teacher_state = None if teacher is None else teacher[1]
        self.train_step = make_train_step(self.train_state, self.mesh, config.compute_dtype, config.loss_chunk_tokens,
                                          mlm=mlm, seed=config.seed, teacher=teacher)
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
        """Each prompt with its continuation, generated together in one batch (`sample_text`)."""
        return sample_text(self.train_state.model(), self.corpus.tokenizer, prompts, max_new_tokens,
                           rng=jax.random.fold_in(self.rng, self.step), context_len=self.config.data.seq_len,
                           temperature=temperature, top_p=top_p)

    def run(self, *, resume: bool = False, until: int | None = None) -> TrainResult:
        """Trains from step 0 (or, with resume, from the newest checkpoint) to `until` (default
        config.steps; the schedule always spans config.steps), then saves, evaluates, samples."""
        config = self.config
        last_step = config.steps if until is None else min(until, config.steps)
        self._refuse_a_bad_start(resume)
        if resume and self.checkpointer.latest_step() is not None:
            self.restore_latest()
        progress, unigram = self._start_run_files(last_step)
        start_step, losses, eval_loss, stop_signal = self.step, {}, None, None
        self._skipped = self._consecutive_nonfinite = 0
        try:
            with StopRequests() as stop:
                # Polled by every process at the top of every step, so that all stop after the same one.
                while self.step < last_step and (stop_signal := stop.poll()) is None:
                    self.train_state.state, metrics = self.train_step(self.train_state.state, self._next_batch(),
                                                                         self.teacher_state)
                    self.step += 1
                    if not bool(metrics["finite"]):
                        self._skip_nonfinite(metrics, progress)
                        continue
                    self._consecutive_nonfinite = 0
                    losses[self.step] = float(metrics["loss"])
                    progress.step(self.step, metrics, record=self.step % config.log_every == 0 or self.step == last_step)
                    if self.step % config.eval_every == 0 or self.step == last_step:
                        eval_loss = self._evaluate_into(progress, eval_loss)
                    if self.step % config.checkpoint.every_steps == 0:
                        self._save()
            if self.step > start_step or stop_signal is not None:
                self._save()  # skipped by the checkpointer when the periodic save just wrote this step
            self.checkpointer.wait()
        finally:
            progress.close()
            self.checkpointer.close()
        return TrainResult(self.step, losses, eval_loss, unigram, self._skipped, stop_signal,
                           self._finish(stop_signal, unigram), self.out_dir)

    def _refuse_a_bad_start(self, resume: bool) -> None:
        """What would make the run fail or overwrite something, found before anything is written."""
        existing, config = self.checkpointer.latest_step(), self.config
        if existing is not None and not resume:
            raise ConfigError(f"out_dir: {self.out_dir} already holds checkpoints (latest step {existing}); "
                              "pass --resume to continue that run or choose another out_dir")
        if self.corpus.eval_documents and next(eval_iterator(config.data, self.corpus), None) is None:
            # Found now, not at the first evaluation after steps that no checkpoint holds yet.
            raise DataError(f"data.eval_files: the held-out documents ({len(held_out_tokens(self.corpus))} tokens) "
                            f"do not fill one batch of {config.data.batch_size} rows of {config.data.seq_len} "
                            "tokens; give more held-out text or a smaller data.batch_size or data.seq_len")
        metrics = self.out_dir / "metrics.jsonl"
        records = read_metrics(metrics) if resume and existing is None and metrics.is_file() else []
        if records:
            # Both causes leave the same files: a run stopped at once (a second stop request, a kill)
            # before its first checkpoint, and checkpoints deleted since.
            raise ConfigError(f"--resume: {self.out_dir} holds the metrics of an earlier run (to step "
                              f"{records[-1]['step']}) but no checkpoint in {self.checkpointer.directory}: it "
                              f"stopped before its first checkpoint (every {config.checkpoint.every_steps} steps), "
                              "or its checkpoints were deleted. Nothing to resume from; remove metrics.jsonl to "
                              "start afresh there, or choose another out_dir")

    def _start_run_files(self, last_step: int) -> tuple[Progress, float]:
        """Writes config.yaml, opens the metrics (process 0 alone writes the run's files), prints
        the run's banner; (its progress reporter, the unigram baseline in nats/token)."""
        config, writer = self.config, jax.process_index() == 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if writer:
            write_atomically(self.out_dir, "config.yaml",
                             lambda file: Path(file).write_text(yaml.safe_dump(to_dict(config), sort_keys=False)))
        unigram = unigram_entropy(self.corpus.train_documents, self.corpus.tokenizer)
        print(f"seqmix: {jax.device_count()} device(s), mesh {describe(self.mesh)}, "
              f"{_count_params(self.train_state)/1e6:.2f}M parameters, unigram baseline {unigram:.3f} nats/token",
              file=sys.stderr)
        log = MetricsLog(self.out_dir / "metrics.jsonl" if writer else None)
        objective = None if config.distill is None else config.distill.loss
        return Progress(log, start=self.step, total=last_step, steps=config.steps, schedule=self.schedule,
                        objective=objective), unigram

    def _skip_nonfinite(self, metrics: dict, progress: Progress) -> None:
        """Reports a step whose update was skipped; stops the run (TrainingError) after
        max_nonfinite_steps of them in a row."""
        self._skipped, self._consecutive_nonfinite = self._skipped + 1, self._consecutive_nonfinite + 1
        what = _nonfinite_quantity(float(metrics["loss"]), float(metrics["grad_norm"]))
        progress.skipped(self.step, metrics, what)
        if self._consecutive_nonfinite >= self.config.max_nonfinite_steps:
            self.checkpointer.wait()
            saved = self.checkpointer.latest_step()
            last_good = ("no checkpoint was saved yet" if saved is None else
                         f"the checkpoint of step {saved} in {self.checkpointer.directory} holds the last good state")
            raise TrainingError(f"{self._consecutive_nonfinite} consecutive non-finite steps (up to step {self.step}, "
                                f"the last: non-finite {what}); stopping: {last_good}")

    def _evaluate_into(self, progress: Progress, eval_loss: float | None) -> float | None:
        """Evaluates on the held-out batches and reports it; the held-out loss (`eval_loss` as it
        was when the run has no held-out documents)."""
        result = self.evaluate()
        if result is None:
            return eval_loss
        progress.evaluation(self.step, result)
        return result["eval_loss"]

    def _finish(self, stop_signal: int | None, unigram: float) -> str | None:
        """After the last step: the loss plot, and the end-of-run sample (None when stopped by a
        signal, switched off, or the model is an MLM encoder, which fills in masks rather than
        continuing text)."""
        if stop_signal is not None:
            print(f"stopped by signal {stop_signal} at step {self.step}; checkpoint saved in "
                  f"{self.checkpointer.directory}", file=sys.stderr)
        if jax.process_index() == 0:
            plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", baseline=unigram)
        if stop_signal is None and self.config.sample_tokens > 0 and self.config.objective == "next_token":
            return self.sample([self.config.sample_prompt], self.config.sample_tokens)[0]
        return None


def _count_params(train_state: TrainState) -> int:
    model_state = train_state.state[0]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(model_state))


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Trains a model as `config` says, holding out_dir's lock throughout (`run_lock`: one
    trainer per run directory; of several processes, process 0 holds it); see `Trainer`. A
    staged run (`stages`) trains its stages in order (`run_stages`). The run's logical axis
    rules (`mesh.rules`) are in effect throughout: they place the state and the batches, and
    the steps are traced under them."""
    owner = run_lock(Path(config.out_dir)) if jax.process_index() == 0 else contextlib.nullcontext()
    with owner, using_rules(config.mesh.rules):
        if config.stages:
            return run_stages(config, resume=resume)
        return Trainer(config).run(resume=resume)


def run_stages(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Trains the stages of `config` one after another (each a whole run in its own directory, the
    last in out_dir: `seqmix.train.config.stage_configs`), each starting from the weights the one
    before it ended with (LoRA adapters merged). With resume, each stage continues from its own
    newest checkpoint: a finished stage restores its last step and trains no more, one not yet
    begun starts afresh. Returns the last stage's result, or that of the stage a signal stopped."""
    weights, mesh, corpus = None, make_mesh(config.mesh), load_corpus(config.data)
    stages = stage_configs(config)
    for index, (name, stage) in enumerate(stages):
        print(f"stage {index + 1}/{len(stages)} ({name}): {stage.steps} steps in {stage.out_dir}", file=sys.stderr)
        trainer = Trainer(stage, mesh=mesh, corpus=corpus, weights=weights)
        begun = trainer.checkpointer.latest_step() is not None
        result = trainer.run(resume=resume and begun)
        if result.stop_signal is not None or index == len(stages) - 1:
            return result
        model = trainer.train_state.model()
        merge_lora(model)
        weights = nnx.state(model, nnx.Param)

