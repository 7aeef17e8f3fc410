"""Faults between runs, as `seqmix train --resume` meets them: with the newest checkpoint corrupt
the run falls back to the one before after a one-line warning; with every checkpoint corrupt, or
the checkpoints deleted under an earlier run's metrics, it stops with one line and exit code 2."""

import shutil

import pytest

from seqmix.cli import main

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
    assert f"--resume: {run} holds the metrics of an earlier run but no checkpoint" in err
    assert (run / "metrics.jsonl").read_text() == metrics
