"""Fine-tuning a Hugging Face checkpoint as a user does: `seqmix train configs/runs/finetune.yaml
init_from=CHECKPOINT data.tokenizer=...` (the model comes from the checkpoint's config.json, LoRA
adapters on q/k/v/o train, the rest stays frozen), on the hybrid families' transformers-made
fixtures; the loss falls and the run samples at its end."""

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models

from seqmix.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"
FINETUNE = "configs/runs/finetune.yaml"


def char_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A character tokenizer.json of `vocab_size` ids (the fixtures' vocabularies are tiny):
    printable characters, then <unk>."""
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))[:vocab_size - 1]
    tokenizer = Tokenizer(models.BPE(vocab={**{c: i for i, c in enumerate(chars)}, "<unk>": len(chars)}, merges=[],
                                     unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def finetune_overrides(tmp_path, name):
    checkpoint = FIXTURES / name
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    return [f"init_from={checkpoint}", f"data.tokenizer={char_tokenizer(tmp_path, vocab)}", f"out_dir={tmp_path / 'run'}",
            "data.seq_len=32", "data.batch_size=8", "steps=8", "optim.lr=1e-2", "optim.warmup_steps=1",
            "log_every=1", "eval_every=100", "eval_batches=1", "checkpoint.every_steps=8", "sample_tokens=6"]


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "train"]


def test_qwen3_next_fine_tunes_with_lora_and_samples(tmp_path, capsys):
    """In process, as `seqmix train`; the end-of-run sample decodes through a cache whose
    attention layers' k_proj is LoRA-wrapped."""
    assert main(["train", FINETUNE, *finetune_overrides(tmp_path, "qwen3_next")]) == 0
    out = capsys.readouterr().out
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    assert "--- sample ---\nROMEO:" in out
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "lora:" in resolved and "layer_pattern" in resolved  # the checkpoint's model, recorded for generate


def test_kimi_linear_fine_tunes_and_samples_through_the_cli(tmp_path):
    """As a process: `seqmix train` on Kimi Linear (KDA, MLA without positions, experts with
    sigmoid routing, expert groups and shared experts), whose end-of-run sample decodes through
    the caches."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    train = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", FINETUNE,
                            *finetune_overrides(tmp_path, "kimi_linear")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    assert "--- sample ---\nROMEO:" in train.stdout


def test_a_run_from_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", FINETUNE, f"init_from={tmp_path}", f"out_dir={tmp_path / 'run'}"]) == 2
    assert f"init_from: {tmp_path} is not a Hugging Face checkpoint directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["train", FINETUNE, f"init_from={tmp_path}", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
