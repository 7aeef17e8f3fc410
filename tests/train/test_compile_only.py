"""`seqmix train ... --compile-only`: the train step compiled for a mesh from abstract shapes,
nothing allocated, trained or written, and XLA's bytes per device reported."""

import math
import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from seqmix.cli import main
from seqmix.mixers import attention
from seqmix.models.lm import LanguageModel
from seqmix.train.compile_check import compile_train_step, parameter_counts
from seqmix.train.config import MeshConfig, load_train_config
from seqmix.train.sharding import make_mesh
from seqmix.train.state import abstract_train_state

pytestmark = pytest.mark.eight_devices


def test_compile_only_reports_memory_per_device_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/runs/smoke.yaml", "mesh.data=2", "mesh.fsdp=4", f"out_dir={run}",
                 "--compile-only"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 115,008, 115,008 of them per token" in out  # transformer_tiny, no experts
    assert "compiled the train step for mesh data=2 x fsdp=4 x expert=1 x tensor=1 x sequence=1 (8 devices)" in out
    assert "per device: arguments" in out and "peak" in out
    assert not run.exists()


def test_remat_cuts_the_train_steps_temporaries_to_under_half(tmp_path, capsys):
    """`remat=true`, as a user asks for it: each block's activations are recomputed in the backward
    pass, so the step keeps the blocks' inputs instead of their activations. At 4 layers of
    attention over 256 tokens the activations are most of the temporaries (measured: 3.5x fewer
    bytes at 512 tokens)."""
    def temporaries(remat):
        assert main(["train", "configs/runs/smoke.yaml", "mesh.data=8", "data.seq_len=256", "model.n_layers=4",
                     f"remat={remat}", f"out_dir={tmp_path / remat}", "--compile-only"]) == 0
        return float(re.search(r"temporaries ([\d.,]+) MiB", capsys.readouterr().out).group(1).replace(",", ""))

    plain, rematerialised = temporaries("false"), temporaries("true")
    assert rematerialised < 0.5 * plain, (rematerialised, plain)


def test_attention_split_over_the_sequence_runs_in_blocks_in_a_fraction_of_the_memory(tmp_path, capsys, monkeypatch):
    """`seqmix train ... mesh.sequence=4 --compile-only` at 1,024 tokens, as a user sizes a
    sequence-parallel run: attention runs `sequence_parallel_attention` (each device's queries in
    blocks against the gathered keys) and the step keeps under half the temporaries of the dense
    form that XLA partitions."""
    def temporaries(name):
        assert main(["train", "configs/runs/smoke.yaml", "mesh.data=2", "mesh.sequence=4", "data.seq_len=1024",
                     "data.batch_size=2", f"out_dir={tmp_path / name}", "--compile-only"]) == 0
        out = capsys.readouterr().out
        assert "sequence=4 (8 devices)" in out
        return float(re.search(r"temporaries ([\d.,]+) MiB", out).group(1).replace(",", ""))

    blocks = temporaries("blocks")
    monkeypatch.setattr(attention, "BLOCKWISE_FROM", 10**9)
    dense = temporaries("dense")
    assert blocks < 0.5 * dense, (blocks, dense)


def test_fsdp_holds_a_quarter_of_the_state_per_device():
    config = load_train_config("configs/runs/smoke.yaml")
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract_train_state(config, make_mesh(MeshConfig(data=8))).state))
    batch_bytes = 5 * config.data.batch_size * config.data.seq_len * 4  # five int32 [B, T] arrays, whole
    replicated = compile_train_step(config, make_mesh(MeshConfig(data=8)))
    sharded = compile_train_step(config, make_mesh(MeshConfig(data=2, fsdp=4)))
    assert replicated.arguments >= state_bytes
    assert sharded.arguments <= 0.3 * state_bytes + batch_bytes, (sharded.arguments, state_bytes)
    assert sharded.peak > sharded.temporaries > 0


@pytest.mark.parametrize("model, total, per_token", [
    ("configs/models/qwen3_next_80b_a3b.yaml", 79_674_391_296, 3_874_929_408),
    ("configs/models/kimi_linear_48b_a3b.yaml", 49_122_681_728, 3_484_459_904),
])
def test_real_size_configs_load_with_the_parameter_counts_they_state(model, total, per_token):
    """The published sizes of Qwen3-Next-80B-A3B and Kimi-Linear-48B-A3B, built abstractly (no
    allocation) through the dry run's config: the counts their headers and RESULTS.md state."""
    config = load_train_config("configs/runs/dry_run_256.yaml", [f"model={model}"])
    abstract = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
    assert parameter_counts(abstract) == (total, per_token)
    header = Path(model).read_text()
    assert f"{total:,}" in header and f"{per_token:,}" in header
