"""What a run writes survives the faults before it: a metrics line an earlier crash left torn is
closed and skipped, and the plot still draws; files are replaced whole (temporary file, then
rename), so a symbolic link in the run directory is replaced, never written through, and the
metrics log refuses to append through one."""

import json
import os

import pytest

from seqmix.configuration import ConfigError
from seqmix.files import write_atomically
from seqmix.train.metrics import MetricsLog, plot_loss, read_metrics

pytestmark = pytest.mark.faults  # the fault suite: pytest -m faults


def test_a_torn_metrics_line_is_closed_skipped_and_the_plot_still_draws(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 3.0}\n{"kind": "train", "st')  # killed mid-write
    log = MetricsLog(path)
    log.write({"kind": "train", "step": 2, "loss": 2.5})
    log.close()
    assert path.read_text().splitlines()[-2:] == ['{"kind": "train", "st', '{"kind": "train", "step": 2, "loss": 2.5}']
    assert [record["step"] for record in read_metrics(path)] == [1, 2]
    assert plot_loss(path, tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_files_are_replaced_whole_and_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's file")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "config.yaml")
    write_atomically(run, "config.yaml", lambda file: open(file, "w").write("steps: 2\n"))
    assert not (run / "config.yaml").is_symlink() and (run / "config.yaml").read_text() == "steps: 2\n"
    assert outside.read_text() == "a user's file" and sorted(os.listdir(run)) == ["config.yaml"]  # no temporary left

    os.symlink(outside, run / "metrics.jsonl")
    with pytest.raises(ConfigError, match="metrics.jsonl: is a symbolic link"):
        MetricsLog(run / "metrics.jsonl")
    assert outside.read_text() == "a user's file"

    def fails(file):
        open(file, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(run, "config.yaml", fails)
    assert (run / "config.yaml").read_text() == "steps: 2\n"  # the previous file intact
    assert json.dumps(sorted(os.listdir(run))) == '["config.yaml", "metrics.jsonl"]'
