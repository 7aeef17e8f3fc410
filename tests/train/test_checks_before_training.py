"""Inputs that cannot work are refused before the first compiled step, with exit code 2 and one
line naming what is wrong, and nothing of the run written: here held-out text too short to fill
one evaluation batch (which used to crash the run at its first evaluation, after steps that no
checkpoint held yet)."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from cli_env import cli_env
from flax import nnx

from seqmix.cli import main
from seqmix.models.generate import CacheTooLarge, cache_length
from seqmix.models.lm import LanguageModel
from seqmix.configuration import ConfigError
from seqmix.train.config import load_train_config

SMOKE = "configs/runs/smoke.yaml"
pytestmark = pytest.mark.faults


def test_held_out_text_shorter_than_one_batch_is_refused_before_training(tmp_path):
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 500)
    (tmp_path / "eval.txt").write_text("Whether 'tis nobler in the mind to suffer.")
    run = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", SMOKE, f"out_dir={tmp_path / 'run'}",
                          "data.corpus=files", f"data.train_files=[{tmp_path / 'train.txt'}]",
                          f"data.eval_files=[{tmp_path / 'eval.txt'}]"],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert ("seqmix: error: data.eval_files: the held-out documents (42 tokens) do not fill one batch of 8 rows "
            "of 64 tokens") in run.stderr
    written = sorted(str(path.relative_to(tmp_path / "run")) for path in (tmp_path / "run").rglob("*"))
    assert written in ([], ["checkpoints"]), written  # orbax's empty directory at most


def test_a_resume_with_another_model_names_the_first_differing_key(tmp_path, capsys):
    common = ["train", SMOKE, f"out_dir={tmp_path}", "steps=2", "eval_every=2", "eval_batches=1", "sample_tokens=0",
              "optim.warmup_steps=1", "checkpoint.every_steps=2"]
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "model.n_heads=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"model.n_heads: the checkpoints in {tmp_path / 'checkpoints'} were trained with 4, this run has 2" in err
    assert len(err.strip().splitlines()) == 1


def test_init_from_a_checkpoint_of_another_architecture_names_every_difference(tmp_path, capsys):
    """The untied Llama fixture (GQA, no windows) into the smoke run's tied, windowed model."""
    checkpoint = "tests/fixtures/hf/llama"
    assert main(["train", SMOKE, f"out_dir={tmp_path}", f"init_from={checkpoint}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"init_from: {checkpoint} holds another architecture" in err
    for difference in ("tie_embeddings: saved False, model True", "layers 0 sliding_window: saved None, model 16"):
        assert difference in err, err
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.weight_decay=-inf", "optim.b2=nan"])
def test_numeric_options_must_be_finite(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: must be a finite number"):
        load_train_config(SMOKE, [override])


def test_a_run_file_is_found_from_any_directory_or_reported_with_the_paths_tried(tmp_path, monkeypatch):
    checkout = Path.cwd()
    monkeypatch.chdir(tmp_path)
    assert load_train_config(SMOKE).steps == 20  # the checkout's configs/runs/smoke.yaml
    run = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", "configs/runs/smoek.yaml"],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (f"configs/runs/smoek.yaml: run config not found (looked for {tmp_path / SMOKE.replace('smoke', 'smoek')} "
            f"and {checkout / SMOKE.replace('smoke', 'smoek')})") in run.stderr


def test_a_run_that_keeps_diverging_stops_with_one_line_and_exit_code_1(tmp_path, capsys):
    assert main(["train", SMOKE, f"out_dir={tmp_path}", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                 "max_nonfinite_steps=2", "checkpoint.every_steps=1", "sample_tokens=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seqmix: error: 2 consecutive non-finite steps") and "Traceback" not in "".join(err)
    assert "the checkpoint of step" in err[-1] or "no checkpoint was saved yet" in err[-1]


@pytest.mark.parametrize("argv, message", [
    (["generate", "RUN", "--prompt", "a", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "RUN", "--prompt", "a", "--top-p", "0"], "--top-p in (0, 1], got 0.8, 0.0"),
    (["generate", "RUN", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["eval", "RUN", "--batches", "0"], "--batches must be at least 1, got 0"),
    (["eval", "RUN", "--needle", "0"], "--needle lengths must be positive"),
])
def test_numeric_flags_out_of_range_are_refused_before_loading_the_run(argv, message, capsys):
    assert main(argv) == 2  # RUN does not exist: the flag is checked first
    assert message in capsys.readouterr().err


def test_a_generation_whose_caches_would_not_fit_is_refused_before_allocating():
    """(`seqmix generate --max-new-tokens 1000000000` through the CLI: tests/train/test_trainer.py.)"""
    model = LanguageModel(load_train_config(SMOKE).model, rngs=nnx.Rngs(0))
    with pytest.raises(CacheTooLarge, match=r"the decode caches of 2 row\(s\) of 1073741824 tokens \(a prompt padded to "
                                            r"16 tokens and 1000000000 new tokens, rounded up to a compiled length\) "
                                            r"need \d+\.\d GiB, more than the \d+\.\d GiB free on cpu"):
        cache_length(model, 2, 16, 10**9, jnp.float32)
    assert cache_length(model, 2, 16, 45, jnp.float32) == 64  # a small one passes, rounded up to a compiled length
