"""`seqmix train ... --compile-only`: the train step compiled for a mesh from abstract shapes,
nothing allocated, trained or written, and XLA's bytes per device reported."""

import math

import jax

from seqmix.cli import main
from seqmix.train.compile_check import compile_train_step
from seqmix.train.config import MeshConfig, load_train_config
from seqmix.train.sharding import make_mesh
from seqmix.train.state import abstract_train_state


def test_compile_only_reports_memory_per_device_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/runs/smoke.yaml", "mesh.data=2", "mesh.fsdp=4", f"out_dir={run}",
                 "--compile-only"]) == 0
    out = capsys.readouterr().out
    assert "compiled the train step for mesh data=2 x fsdp=4 x expert=1 x tensor=1 x sequence=1 (8 devices)" in out
    assert "per device: arguments" in out and "peak" in out
    assert not run.exists()


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
