"""What a training run reports while it trains: a record in metrics.jsonl every `log_every` steps
(loss, learning rate, gradient norm, tokens/s), one per evaluation and one per skipped step, and on
the terminal a progress bar (or, when stderr is not a terminal, a line per record)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from seqmix.train.metrics import MetricsLog


class Progress:
    """Reports the steps `start`+1 .. `total` of a run of `steps` steps into `log`. schedule: the
    learning rate of a step index; objective: what "loss" is when it is not the cross-entropy (a
    distilling run's `distill.loss`), recorded with each train record."""

    def __init__(self, log: MetricsLog, *, start: int, total: int, steps: int, schedule: Callable,
                 objective: str | None = None):
        self.log, self.steps, self.schedule, self.objective = log, steps, schedule, objective
        self.bar = tqdm(total=total, initial=start, disable=not sys.stderr.isatty(), unit="step")
        self.tokens, self.since = 0.0, time.perf_counter()

    def step(self, step: int, metrics: dict, *, record: bool) -> None:
        """A finite step done; `record`: write its metrics (and reset the tokens/s window)."""
        self.tokens += float(metrics["tokens"])
        if record:
            elapsed = time.perf_counter() - self.since
            entry = {"kind": "train", "step": step, "loss": float(metrics["loss"]), "lr": float(self.schedule(step - 1)),
                     "grad_norm": float(metrics["grad_norm"]), "aux_loss": float(metrics["aux_loss"]),
                     "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
            if self.objective is not None:
                entry["objective"] = self.objective
            self.log.write(entry)
            self.bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if self.bar.disable:
                print(f"step {step}/{self.steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                      f"{entry['tokens_per_s']:.0f} tok/s", file=sys.stderr)
            self.tokens, self.since = 0.0, time.perf_counter()
        self.bar.update(1)

    def skipped(self, step: int, metrics: dict, what: str) -> None:
        """A step whose update was skipped because `what` was not finite."""
        self.tokens += float(metrics["tokens"])
        self.log.write({"kind": "nonfinite", "step": step, "loss": float(metrics["loss"]), "what": what})
        print(f"step {step}: non-finite {what}; update skipped", file=sys.stderr)

    def evaluation(self, step: int, result: dict[str, float]) -> None:
        self.log.write({"kind": "eval", "step": step, **result})
        print(f"step {step}: held-out loss {result['eval_loss']:.4f} (perplexity {result['eval_ppl']:.2f})",
              file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.log.close()
