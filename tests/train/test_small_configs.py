"""The newer mixers' small configs train as a user trains them: `seqmix train configs/runs/smoke.yaml
model=configs/models/<name>.yaml compute_dtype=bfloat16`, in process, on the Shakespeare corpus; the
held-out loss falls below the unigram baseline (what a model that ignores context reaches) within
30 steps, and the run samples at its end. One layer of each config (`model.n_layers=1`, every other
option the config's): compiling the full depth would cost the suite about three minutes more and
test nothing the layer does not."""

import re

import pytest

from seqmix.cli import main

SMALL_CONFIGS = ["s4d_small", "spectral_ssm_small", "mamba_small", "longhorn_small", "nalaformer_small",
                 "local_linear_attention_small", "bmojo_small"]


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_a_small_config_trains_below_the_unigram_baseline_in_bfloat16(tmp_path, capsys, name):
    assert main(["train", "configs/runs/smoke.yaml", f"model=configs/models/{name}.yaml", f"out_dir={tmp_path}",
                 "model.n_layers=1", "steps=30", "optim.lr=1e-2", "optim.warmup_steps=5", "eval_every=30", "eval_batches=2",
                 "checkpoint.every_steps=30", "sample_tokens=8", "compute_dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    held_out, unigram = map(float, re.search(r"held-out loss ([\d.]+) nats/token \(unigram baseline ([\d.]+)\)",
                                             out).groups())
    assert held_out < unigram, (held_out, unigram)
    assert "--- sample ---\nROMEO:" in out
