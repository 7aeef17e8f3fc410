"""Faults between runs, as `seqmix train --resume` (and the run loader of generate) meets them: with
the newest checkpoint corrupt the run falls back to the one before after a one-line warning; with
every checkpoint corrupt, or the checkpoints deleted under an earlier run's metrics, it stops with
one line and exit code 2; a checkpoint the disk cannot take stops the run with one line, the one
before it intact."""

import resource
import shutil
import signal
import subprocess
import sys

import pytest

from cli_env import cli_env
from seqmix.cli import main
from seqmix.train.checkpoint import _os_reason

pytestmark = pytest.mark.faults  # the fault suite: pytest -m faults

SMOKE = "configs/runs/smoke.yaml"
SHORT = ["steps=4", "eval_every=4", "eval_batches=1", "sample_tokens=0", "optim.warmup_steps=1",
         "checkpoint.every_steps=2"]


def corrupt(run, step):
    """Cuts every array file of a checkpoint's state to 10 bytes (a disk that lost them)."""
    for path in (run / "checkpoints" / str(step) / "state").rglob("d/*"):
        path.write_bytes(path.read_bytes()[:10])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", SMOKE, f"out_dir={run}", *SHORT]) == 0
    return run


def resume(run, capsys, steps=6):
    code = main(["train", SMOKE, f"out_dir={run}", *SHORT, f"steps={steps}", "eval_every=6", "--resume"])
    return code, capsys.readouterr().err


def test_a_corrupt_newest_checkpoint_falls_back_after_one_warning(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    corrupt(run, 4)
    code, err = resume(run, capsys)
    assert code == 0 and "Traceback" not in err and "Event loop is closed" not in err
    lines = err.splitlines()
    newest = run / "checkpoints" / "4"
    assert lines[0].startswith(f"seqmix: warning: cannot restore the checkpoint of step 4 ({newest}): ")
    assert lines[0].endswith("; trying the one before")
    assert lines[1] == f"resumed from step 2 ({run / 'checkpoints'})"


def test_every_checkpoint_corrupt_is_one_clear_error(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    corrupt(run, 2)
    corrupt(run, 4)
    code, err = resume(run, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"seqmix: error: out_dir: no checkpoint in {run / 'checkpoints'} could be "
                                           "restored (step 4 (")


def test_deleted_checkpoints_under_old_metrics_are_reported_not_restarted_over(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    metrics = (run / "metrics.jsonl").read_text()
    code, err = resume(run, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"--resume: {run} holds the metrics of an earlier run (to step 4) but no checkpoint in "
            f"{run / 'checkpoints'}: it stopped before its first checkpoint (every 2 steps), or its checkpoints "
            "were deleted") in err
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_checkpoint_the_disk_cannot_take_stops_the_run_in_one_line_and_keeps_the_one_before(trained, tmp_path,
                                                                                             capsys):
    """The disk's refusal is real: the process may write no file larger than 64 KiB (the
    checkpoint's array files are larger; metrics and config lines are not), the error a full disk
    gives but for its wording ("File too large" where a full disk says "No space left on device")."""
    run = shutil.copytree(trained, tmp_path / "run")

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    command = [sys.executable, "-m", "seqmix.cli", "train", SMOKE, f"out_dir={run}", *SHORT, "steps=6",
               "eval_every=6", "--resume"]
    # Without the tests' compilation cache, whose entries are files larger than the limit too.
    env = {key: value for key, value in cli_env().items() if key != "JAX_COMPILATION_CACHE_DIR"}
    full = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files_only)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.splitlines()[-1] == (
        f"seqmix: error: the checkpoint of step 6 could not be written in {run / 'checkpoints'}: File too large; "
        "the checkpoint of step 4 is the newest complete one")
    assert len(full.stderr.splitlines()) < 12  # the run's own lines, no library's reports of the failure
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["2", "4"]  # no partial step 6
    code, err = resume(run, capsys)
    assert code == 0 and "resumed from step 4" in err and "warning" not in err


ORPHANED_COROUTINE = """
import asyncio, gc, sys
from seqmix.library_noise import keep_library_noise_out
if sys.argv[1] == "filtered":
    keep_library_noise_out()
loop = asyncio.new_event_loop()
loop.close()
async def write_shard():  # as orbax's coroutines meet a loop that closed before they ran
    pass
try:
    asyncio.run_coroutine_threadsafe(write_shard(), loop)
except RuntimeError:
    pass
gc.collect()
print("seqmix: error: the run's own line", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["filtered", "verbose"])
def test_a_library_coroutine_orphaned_by_a_failure_adds_no_warning_after_the_error_line(mode):
    """CI once saw "RuntimeWarning: Enable tracemalloc ..." as the last line of the full-disk run
    above: the garbage collector's report of a coroutine orbax had created for a loop already closed."""
    run = subprocess.run([sys.executable, "-c", ORPHANED_COROUTINE, mode], capture_output=True, text=True,
                         timeout=60, env=cli_env())
    assert run.returncode == 0, run.stderr
    if mode == "filtered":
        assert run.stderr == "seqmix: error: the run's own line\n"
    else:  # the warning is real, and --verbose (which installs no filter) shows it
        assert "coroutine 'write_shard' was never awaited" in run.stderr


@pytest.mark.parametrize("message, reason", [
    ('RESOURCE_EXHAUSTED: Error writing local file "/run/checkpoints/6.orbax-checkpoint-tmp/d/1a": '
     'No space left on device [os_error_code=28] [source locations=...]', "No space left on device"),
    ('OUT_OF_RANGE: Error writing "0.params.kernel.value/.zarray" in OCDBT database at local file\n'
     '"/run/checkpoints/6.orbax-checkpoint-tmp/state/ocdbt.process_0/d/2b": File too large', "File too large"),
    ("Checkpoint manager lost its thread", None),
])
def test_the_os_reason_is_read_from_each_wording_tensorstore_gives(message, reason):
    assert _os_reason(message) == reason


def test_generate_loads_past_a_corrupt_checkpoint_as_resume_does(trained, tmp_path, capsys):
    """The run loader (`seqmix generate`, `eval`, `export`, `seqmix.load_run`) keeps the fallback: one
    warning, then the checkpoint before; with every checkpoint corrupt, or none, one line and exit 2."""
    run = shutil.copytree(trained, tmp_path / "run")
    corrupt(run, 4)

    def generate():
        code = main(["generate", str(run), "--prompt", "KING", "--max-new-tokens", "2"])
        return code, capsys.readouterr()

    code, captured = generate()
    assert code == 0 and captured.out.startswith("KING")
    lines, newest = captured.err.splitlines(), run / "checkpoints" / "4"
    assert lines[0].startswith(f"seqmix: warning: cannot restore the checkpoint of step 4 ({newest}): ")
    assert lines[0].endswith("; trying the one before") and lines[1] == f"loaded step 2 of {run}"
    corrupt(run, 2)
    code, captured = generate()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.err.splitlines()[-1].startswith(f"seqmix: error: {run}: no checkpoint in {run / 'checkpoints'} "
                                                    "could be restored (step 4 (")
    shutil.rmtree(run / "checkpoints")
    assert generate() == (2, ("", f"seqmix: error: {run}: no checkpoint in {run / 'checkpoints'} (the run has not "
                                  "saved one yet)\n"))
