"""A run of 2 local processes x 4 CPU devices joined by `jax.distributed` (loopback only, bounded
in time): it trains, both processes write its checkpoints, and a single process restores one
and trains the next steps to the losses the 2-process run logged."""

import json
import shutil
import socket
import subprocess
import sys

import pytest

from cli_env import cli_env
from seqmix.train.config import load_train_config
from seqmix.train.trainer import Trainer

TIMEOUT_SECONDS = 300


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
