"""Run metrics: JSON lines on disk and a loss-curve plot drawn from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from seqmix.configuration import ConfigError
from seqmix.files import write_atomically


class MetricsLog:
    """Appends one JSON object per line to `path` (a resumed run continues the same file);
    with `path` None (a process that does not write the run's files) it keeps nothing. A line an
    earlier crash left torn is closed first, so the next record starts a line of its own; a
    symbolic link is refused (the run writes inside its out_dir only)."""

    def __init__(self, path: str | Path | None):
        self._file = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError:
                if path.is_symlink():
                    raise ConfigError(f"{path}: is a symbolic link; a run writes its metrics inside its out_dir only "
                                      "(remove the link)") from None
                raise
            self._file = os.fdopen(descriptor, "a")
            if _ends_torn(path):
                self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (a crash mid-write)."""
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; for steps logged twice (a resumed run) the last record wins; a
    line a crash left torn is skipped."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # blank, or torn by a crash mid-write
            continue
        if isinstance(record, dict) and "step" in record:
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
    write_atomically(out_path.parent, out_path.name, lambda file: fig.savefig(file, dpi=100, format="png"))
    plt.close(fig)
    return out_path
