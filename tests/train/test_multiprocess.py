"""Runs of 2 local processes x 4 CPU devices joined by `jax.distributed` (loopback only, bounded
in time): one trains, both processes write its checkpoints, and a single process restores one
and trains the next steps to the losses the 2-process run logged. Then the faults, as a user
meets them at the command line: a stop request that reaches one process of two, a second request,
processes started with different configs, and processes that never start."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_env import cli_env
from seqmix.train.checkpoint import Checkpointer
from seqmix.train.config import load_train_config
from seqmix.train.trainer import Trainer

TIMEOUT_SECONDS = 300
GLOO_PHRASES = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. ?|Expected number of connected peer ranks is : \d+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_two_processes_train_and_checkpoint_and_one_process_resumes_their_run(tmp_path):
    run = tmp_path / "run"
    overrides = ["steps=4", "optim.warmup_steps=1", "log_every=1", "eval_every=4", "eval_batches=1", "sample_tokens=0", "data.seq_len=32",
                 "checkpoint.every_steps=2", "checkpoint.keep=3", f"out_dir={run}"]
    port = free_port()
    env = cli_env(devices=4)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "seqmix.cli", "train", "configs/runs/smoke.yaml", *overrides,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_SECONDS)[0])
    finally:
        for process in processes:
            process.kill()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {index}:\n{output[-3000:]}"
        assert "seqmix: 8 device(s)" in output, output[-3000:]  # one mesh over both processes
    for step in (2, 4):
        names = sorted(p.name for p in (run / "checkpoints" / str(step) / "data").glob("process_*"))
        assert names == ["process_0-of-2.json", "process_1-of-2.json"], names
    logged = train_losses(run)
    assert sorted(logged) == [1, 2, 3, 4]

    # One process with the same 8 (fake) devices resumes from step 2 and trains steps 3 and 4.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    config = load_train_config(resumed_dir / "config.yaml", [f"out_dir={resumed_dir}"])
    result = Trainer(config).run(resume=True)
    assert sorted(result.losses) == [3, 4]
    for step in (3, 4):
        assert result.losses[step] == pytest.approx(logged[step], rel=1e-5), (step, result.losses, logged)


SMALL = ["optim.warmup_steps=1", "log_every=1", "eval_every=100000", "eval_batches=1", "sample_tokens=0",
         "data.seq_len=32", "checkpoint.every_steps=100000"]


def start(run, index: int, port: int, *overrides: str, processes: int = 2, devices: int = 4,
          options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, object]:
    """`seqmix train` as process `index` of `processes`, its output in run/../process_{index}.log."""
    log = run.parent / f"process_{index}.log"
    command = [sys.executable, "-m", "seqmix.cli", "train", "configs/runs/smoke.yaml", *SMALL, *overrides,
               f"out_dir={run}", *options]
    if processes > 1:
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                    "--process-id", str(index)]
    with open(log, "w") as file:
        return subprocess.Popen(command, env=cli_env(devices=devices), stdout=file, stderr=subprocess.STDOUT), log


def finish(started, timeout: float = 120) -> list[tuple[int, str]]:
    """Each process's (exit code, output), killing any still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        for process, _ in started:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process, _ in started:
            process.kill()
    return [(process.wait(), log.read_text()) for process, log in started]


def wait_for_step(started, step: int, timeout: float = 120) -> None:
    """Until every process has printed the line of `step` (the run is in its loop on all of them)."""
    deadline = time.monotonic() + timeout
    while not all(f"step {step}/" in log.read_text() for _, log in started):
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in started), \
            [log.read_text()[-3000:] for _, log in started]
        time.sleep(0.2)


@pytest.mark.faults
def test_a_stop_request_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    run, port = tmp_path / "run", free_port()
    started = [start(run, index, port, "steps=100000") for index in range(2)]
    wait_for_step(started, 2)
    # A scheduler's SIGTERM to the coordinator alone used to leave both processes waiting forever.
    started[0][0].send_signal(signal.SIGTERM)
    results = finish(started)
    stopped_at = set()
    for index, (code, output) in enumerate(results):
        assert code == 128 + signal.SIGTERM, f"process {index}:\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("stopped by signal 15 at step ")]
        assert len(lines) == 1, output[-3000:]
        stopped_at.add(int(lines[0].split()[6].rstrip(";")))
    assert "process 0 received SIGTERM: every process stops" in results[1][1]
    assert len(stopped_at) == 1, stopped_at  # the same step on both
    step = stopped_at.pop()
    checkpoints = run / "checkpoints"
    assert Checkpointer(checkpoints).latest_step() == step
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [step]  # one checkpoint
    names = sorted(p.name for p in (checkpoints / str(step) / "data").glob("process_*"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"], names


@pytest.mark.faults
def test_a_second_stop_request_exits_at_once_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    started = [start(run, 0, 0, "steps=100000", processes=1, devices=1)]
    wait_for_step(started, 2)
    # Two different signals, so that the kernel cannot merge them into one pending signal (it may
    # deliver them in either order).
    os.kill(started[0][0].pid, signal.SIGINT)
    os.kill(started[0][0].pid, signal.SIGTERM)
    [(code, output)] = finish(started, timeout=30)
    assert code - 128 in (signal.SIGINT, signal.SIGTERM), output[-3000:]
    second = signal.Signals(code - 128)
    assert f"second stop request ({second.name}): exiting now without a checkpoint" in output, output[-3000:]
    assert "Traceback" not in output and "stopped by signal" not in output, output[-3000:]
    assert Checkpointer(run / "checkpoints").latest_step() is None
    # Resuming it is refused before any step: its metrics stay, and the error says why none was saved.
    metrics = (run / "metrics.jsonl").read_text()
    [(code, output)] = finish([start(run, 0, 0, "steps=100000", processes=1, devices=1, options=("--resume",))])
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert re.search(rf"holds the metrics of an earlier run \(to step \d+\) but no checkpoint in {re.escape(str(run))}"
                     r"/checkpoints: it stopped before its first checkpoint \(every 100000 steps\)", output), output
    assert (run / "metrics.jsonl").read_text() == metrics


@pytest.mark.faults
def test_processes_started_with_different_configs_are_refused_on_every_process(tmp_path):
    run, port = tmp_path / "run", free_port()
    started = [start(run, 0, port, "steps=4"), start(run, 1, port, "steps=5")]
    for index, (code, output) in enumerate(finish(started)):
        assert code == 2, f"process {index}:\n{output[-3000:]}"
        assert "seqmix: error: steps: process 0 has 4, process 1 has 5" in output, output[-3000:]
        # gloo (the CPU collectives) prints a line as each process group forms: not seqmix's to
        # silence. Its threads write in pieces that may interleave mid-line, so its phrases are cut out.
        lines = [line for line in GLOO_PHRASES.sub("", output).splitlines() if line.strip()]
        assert "Traceback" not in output and len(lines) == 1, output[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@pytest.mark.faults
def test_a_process_that_never_starts_is_named_with_the_coordinator(tmp_path):
    port, lone_port = free_port(), free_port()
    # Process 2 waits longer than process 0, so that it surely hears process 0's verdict, however
    # unevenly the loaded machine starts them; both name process 1.
    started = [start(tmp_path / "run", index, port, processes=3, options=("--startup-timeout", wait))
               for index, wait in ((0, "3"), (2, "30"))]
    # And a process whose coordinator (process 0) never starts.
    (tmp_path / "alone").mkdir()
    started.append(start(tmp_path / "alone" / "run", 1, lone_port, options=("--startup-timeout", "3")))
    results = finish(started, timeout=60)
    for index, (code, output) in enumerate(results):
        assert code == 2, output[-3000:]
        assert "Traceback" not in output and len(output.splitlines()) <= 2, output[-3000:]
    for _, output in results[:2]:
        assert f"process(es) 1 of 3 did not join the run at the coordinator 127.0.0.1:{port}" in output, output
    assert f"process 1 found no coordinator at 127.0.0.1:{lone_port} (process 0) within 3 s" in results[2][1]
