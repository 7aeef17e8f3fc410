"""Run metrics: JSON lines on disk and a loss-curve plot drawn from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to `path` (a resumed run continues the same file);
    with `path` None (a process that does not write the run's files) it keeps nothing."""

    def __init__(self, path: str | Path | None):
        self._file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = Path(path).open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; for steps logged twice (a resumed run) the last record wins."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_key[(record.get("kind"), record["step"])] = record
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_loss(metrics_path: str | Path, out_path: str | Path, baseline: float | None = None) -> Path:
    """Draws train and held-out loss against step into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, key, style in (("train", "loss", "-"), ("eval", "eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get("kind") == kind]
        if points:
            ax.plot(*zip(*points), style, label=f"{kind} loss", markersize=3)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
