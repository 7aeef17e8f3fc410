"""One run, one owner: a training run holds an exclusive lock on its out_dir for its whole life,
so a second trainer started on the same directory is refused instead of overwriting the first
one's checkpoints and interleaving its metrics.

The lock is a file, `out_dir/run.lock`, created exclusively (O_EXCL) and holding the owner's pid,
host and start time; it is removed when the run ends, however it ends short of SIGKILL. A lock
left by a process that no longer exists (a killed run) is stale: the next run on this host takes it
over with a warning. A lock from another host cannot be checked and is refused, naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from seqmix.configuration import ConfigError

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock file's owner record, or None if it is unreadable (torn by a crash mid-write)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _create(path: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Holds `out_dir`'s lock for the body (creating out_dir); ConfigError if a live run holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    try:
        _create(path)
    except FileExistsError:
        holder = _holder(path)
        here = socket.gethostname()
        if holder is not None and (holder.get("host") != here or _alive(holder["pid"])):
            raise ConfigError(
                f"out_dir: {out_dir} is in use by another training run (pid {holder['pid']} on {holder.get('host')}, "
                f"since {holder.get('since')}); wait for it to finish or choose another out_dir (if that process "
                f"is gone, delete {path})") from None
        # Stale (its process is gone) or torn: moved aside atomically, so of two runs taking it
        # over at once only one succeeds, then created afresh.
        aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(path, aside)
            aside.unlink()
            _create(path)
        except (FileNotFoundError, FileExistsError):
            raise ConfigError(f"out_dir: {out_dir} was just taken by another training run") from None
        owner = f"pid {holder['pid']}, which no longer runs" if holder else "an unreadable owner record"
        print(f"seqmix: warning: took over a stale lock on {out_dir} ({owner})", file=sys.stderr)
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
