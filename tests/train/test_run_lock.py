"""One run, one owner (`seqmix.train.run_lock`): a second trainer on a directory a live run holds
is refused before it trains, by a short message naming the directory and the holder; a lock left
by a killed run is taken over with a warning and released at the end; a lock from another host,
which cannot be checked, is refused."""

import json
import os
import socket
import subprocess
import sys

import pytest
from cli_env import cli_env

from seqmix.configuration import ConfigError
from seqmix.train.run_lock import LOCK_FILE, run_lock

pytestmark = pytest.mark.faults  # the fault suite: pytest -m faults

SMOKE = "configs/runs/smoke.yaml"


def held_by(directory, pid, host=None):
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "since": "2026-12-02 09:00:00"}
    (directory / LOCK_FILE).write_text(json.dumps(record))


def test_a_second_trainer_on_a_held_directory_is_refused_before_training(tmp_path):
    held_by(tmp_path, os.getpid())  # this test process is alive: the holder
    run = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", SMOKE, f"out_dir={tmp_path}"],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert f"out_dir: {tmp_path} is in use by another training run (pid {os.getpid()} on" in run.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()  # the holder's lock stays


def test_the_lock_of_a_killed_run_is_taken_over_and_released_at_the_end(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    held_by(tmp_path, gone.pid)
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"warning: took over a stale lock on {tmp_path} (pid {gone.pid}, which no longer runs)" in \
        capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_and_a_torn_one_taken_over(tmp_path, capsys):
    held_by(tmp_path, 1, host="elsewhere")
    with pytest.raises(ConfigError, match=r"in use by another training run \(pid 1 on elsewhere, since 2026-12-02"):
        with run_lock(tmp_path):
            pass
    (tmp_path / LOCK_FILE).write_text('{"pid": 12')  # torn by a crash mid-write
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "(an unreadable owner record)" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()
