"""End to end: the trainer on the real Shakespeare corpus with a tiny model."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import seqmix
from cli_env import cli_env
from seqmix.cli import main
from seqmix.mixers import attention
from seqmix.models import generate as generation
from seqmix.train.checkpoint import Checkpointer
from seqmix.train.config import DataConfig, load_train_config
from seqmix.train.data import ByteTokenizer, prepare_shakespeare
from seqmix.train.inputs import load_corpus
from seqmix.train.trainer import Trainer, TrainingError

SMOKE = "configs/runs/smoke.yaml"


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig())


def smoke_config(tmp_path, *overrides):
    return load_train_config(SMOKE, [f"out_dir={tmp_path}", "mesh.data=1", *overrides])


def single_device_trainer(config, corpus):
    from seqmix.train.sharding import make_mesh

    return Trainer(config, mesh=make_mesh(config.mesh, devices=jax.devices()[:1]), corpus=corpus)


def test_loss_decreases_on_a_tiny_config(tmp_path, corpus):
    config = smoke_config(tmp_path, "steps=40", "log_every=1", "eval_every=40", "optim.warmup_steps=5", "sample_tokens=20")
    result = single_device_trainer(config, corpus).run()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 40 and losses[0] > 5.0  # log(256) = 5.55 at initialisation
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5
    assert result.eval_loss < 3.6 and result.unigram_loss == pytest.approx(3.33, abs=0.05)
    assert result.sample.startswith("ROMEO:") and len(result.sample) > len("ROMEO:")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 41))
    assert any(r["kind"] == "eval" and r["eval_ppl"] > 1 for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 40


def test_resume_reproduces_an_uninterrupted_run(tmp_path, corpus):
    """2N steps in one go vs N steps, a fresh process state restored from the checkpoint, N more."""
    overrides = ("steps=12", "log_every=1", "eval_every=100", "sample_tokens=0", "checkpoint.every_steps=100")
    whole = single_device_trainer(smoke_config(tmp_path / "whole", *overrides), corpus).run()

    first = single_device_trainer(smoke_config(tmp_path / "split", *overrides), corpus)
    first_half = first.run(until=6)
    second = single_device_trainer(smoke_config(tmp_path / "split", *overrides), corpus)
    second.restore_latest()
    assert second.step == 6
    replay = single_device_trainer(smoke_config(tmp_path / "replay", *overrides), corpus)
    for _ in range(6):
        next(replay.data)
    expected_batch, resumed_batch = next(replay.data), next(second.data)
    for key in expected_batch:
        np.testing.assert_array_equal(resumed_batch[key], expected_batch[key])

    resumed = single_device_trainer(smoke_config(tmp_path / "split", *overrides), corpus).run(resume=True)
    split_losses = {**first_half.losses, **resumed.losses}
    assert sorted(split_losses) == list(range(1, 13))
    assert split_losses == whole.losses  # bit-identical on CPU


def test_existing_checkpoints_need_resume(tmp_path, corpus):
    config = smoke_config(tmp_path, "steps=5", "sample_tokens=0")
    single_device_trainer(config, corpus).run()
    with pytest.raises(Exception, match="--resume"):
        single_device_trainer(config, corpus).run()


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, corpus):
    config = smoke_config(tmp_path, "steps=20", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                          "max_nonfinite_steps=3", "log_every=1")
    trainer = single_device_trainer(config, corpus)
    # lr 1e30 overflows the update, not the loss or the gradients; no checkpoint exists yet.
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps \(up to step \d+, the last: non-finite "
                                            r"parameters after the update \(loss \d+\.\d+, .*no checkpoint was saved yet"):
        trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["kind"] == "nonfinite"]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert all(r["what"].startswith("parameters after the update") for r in records if r["kind"] == "nonfinite")
    # A skipped update leaves the parameters as they were: still finite.
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(trainer.train_state.state))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    env = cli_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "seqmix.cli", "train", SMOKE, f"out_dir={out}", "steps=100000",
         "log_every=1", "eval_every=100000", "checkpoint.every_steps=100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output
    saved = Checkpointer(out / "checkpoints").latest_step()
    assert saved is not None and saved >= 3
    trainer = single_device_trainer(load_train_config(out / "config.yaml", ["mesh.data=1"]), corpus)
    trainer.restore_latest()
    assert trainer.step == saved


# `seqmix generate` with the trainer and its train step made unusable: it must need neither.
NO_TRAINER = """import sys, seqmix.train.step as step, seqmix.train.trainer as trainer
def refuse(*args, **kwargs):
    raise AssertionError("generate built a Trainer or a train step")
step.make_train_step = trainer.make_train_step = trainer.Trainer.__init__ = refuse
from seqmix.cli import main
sys.exit(main(sys.argv[1:]))"""


def test_a_long_context_run_trains_evaluates_and_samples_through_the_cli(tmp_path, capsys):
    """`seqmix train` at 1,024 tokens a row: both attention layers of transformer_tiny (a window of
    16 and global) attend in blocks (`attention.BLOCKWISE_FROM`), with `remat=true`; the loss falls,
    the held-out loss is reported, and the end-of-run sample decodes through the caches. Then
    `seqmix generate` continues a prompt longer than `generate.PREFILL_CHUNK` (prefilled in pieces)
    greedily, as the trained model's full forward does."""
    assert attention.BLOCKWISE_FROM <= 1024
    assert main(["train", SMOKE, f"out_dir={tmp_path}", "mesh.data=1", "data.seq_len=1024", "data.batch_size=2",
                 "steps=6", "optim.warmup_steps=1", "optim.lr=1e-2", "log_every=1", "eval_every=6", "eval_batches=1",
                 "checkpoint.every_steps=6", "sample_tokens=8", "remat=true"]) == 0
    out = capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert re.search(r"held-out loss [\d.]+ nats/token", out) and "--- sample ---\nROMEO:" in out
    valid = prepare_shakespeare(DataConfig().cache_dir) / "valid.jsonl"
    prompt = "".join(json.loads(line)["text"] for line in valid.read_text().splitlines())[:1100]
    assert len(prompt.encode()) > generation.PREFILL_CHUNK
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    model, _ = seqmix.load_run(tmp_path)
    tokens = np.asarray([ByteTokenizer().encode(prompt)], np.int32)
    for _ in range(8):
        tokens = np.concatenate([tokens, np.argmax(np.asarray(model(tokens))[:, -1:], axis=-1)], axis=1)
    assert capsys.readouterr().out.rstrip("\n") == ByteTokenizer().decode(tokens[0])


def test_cli_generate_eval_and_errors(tmp_path, corpus, capsys):
    """On a files-corpus run whose training file is deleted after training: generate and eval read
    the run's config, its newest checkpoint's parameters and (eval) the held-out file alone."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "valid"):  # the corpus fixture's documents, as files
        shutil.copy(prepare_shakespeare(DataConfig().cache_dir) / f"{name}.jsonl", data)
    trainer = single_device_trainer(smoke_config(tmp_path, "steps=5", "sample_tokens=0", "data.corpus=files",
                                                 f"data.train_files=[{data / 'train.jsonl'}]",
                                                 f"data.eval_files=[{data / 'valid.jsonl'}]"), corpus)
    trainer.run()
    (data / "train.jsonl").unlink()
    done = subprocess.run([sys.executable, "-c", NO_TRAINER, "generate", str(tmp_path), "--prompt", "KING",
                           "--max-new-tokens", "4"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("KING") and f"loaded step 5 of {tmp_path}" in done.stderr
    # seqmix.load_run: the trained parameters, the same logits.
    model, config = seqmix.load_run(tmp_path)
    assert config.data.train_files == [str(data / "train.jsonl")]
    trained = trainer.train_state.model()
    for loaded, saved in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(trained))):
        np.testing.assert_array_equal(loaded, saved)
    tokens = np.asarray([corpus.tokenizer.encode("KING RICHARD III")], np.int32)
    np.testing.assert_allclose(model(tokens), trained(tokens), rtol=1e-5, atol=1e-5)
    assert main(["generate", str(tmp_path / "checkpoints"), "--prompt", "KING", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and len(text.rstrip("\n").encode()) >= len("KING")
    assert main(["generate", str(tmp_path), "--prompt", "KING", "--prompt", "QUEEN MARGARET:", "--max-new-tokens",
                 "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and "\n\nQUEEN MARGARET:" in text
    assert main(["generate", str(tmp_path), "--prompt", "KING", "--prompt", ""]) == 2
    assert "--prompt: an empty prompt" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "KING", "--max-new-tokens", "1000000000"]) == 2
    assert re.search(r"--max-new-tokens 1000000000: the decode caches of 1 row\(s\) of 1073741824 tokens \(a prompt "
                     r"padded to 16 tokens and 1000000000 new tokens, rounded up to a compiled length\) need "
                     r"\d+\.\d GiB, more than the \d+\.\d GiB free on cpu", capsys.readouterr().err)
    assert main(["eval", str(tmp_path), "--batches", "2"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert main(["eval", str(tmp_path), "--kl"]) == 2  # trained from scratch: no teacher to default to
    assert "--kl: name the reference model (the run has no init_from to default to)" in capsys.readouterr().err
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "KING HENRY", "choices": [":", " V."], "gold": 0}\n')
    assert main(["eval", str(tmp_path), "--choices", str(task)]) == 0
    assert re.search(r"task.jsonl: acc [01]\.0000, acc_norm [01]\.0000 over 1 examples", capsys.readouterr().out)
    task.write_text('{"context": "KING", "choices": [":"], "gold": 0}\n')
    assert main(["eval", str(tmp_path), "--choices", str(task)]) == 2
    assert "task.jsonl:1: 'choices' must be a list of at least 2" in capsys.readouterr().err
    assert main(["train", SMOKE, "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a seqmix run directory" in capsys.readouterr().err
    assert main(["train", SMOKE, "data.corpus=files", f"data.train_files=[{tmp_path}/none.txt]"]) == 2
    assert "none.txt" in capsys.readouterr().err
