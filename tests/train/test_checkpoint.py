"""Checkpointer: round trip with a grain iterator, keep-N, fallback past corrupt or partial
checkpoints, and restore into another mesh."""

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix.train.checkpoint import Checkpointer, CheckpointsUnreadable

pytestmark = pytest.mark.eight_devices


def _mesh(shape):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, ("data", "fsdp"), (AxisType.Auto,) * 2, devices=jax.devices()[:n])


def _state(mesh, offset=0.0):
    w = jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) + offset
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("fsdp", None))),
            "scale": jax.device_put(jnp.float32(2.5 + offset), NamedSharding(mesh, P())),
        },
        "opt": {"count": jax.device_put(jnp.int32(7), NamedSharding(mesh, P()))},
    }


def _abstract(mesh):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)),
        _state(mesh),
    )


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).to_iter_dataset())


def _iterator_advanced(n):
    it = _iterator()
    for _ in range(n):
        next(it)
    return it


def _assert_state_equal(restored, expected):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def mesh8():
    return _mesh((2, 4))


def _save_steps(directory, mesh, steps, **kwargs):
    """Saves `steps` as a run would: at step s the iterator has yielded s elements."""
    ckpt = Checkpointer(directory, **kwargs)
    for step in steps:
        ckpt.save(step, _state(mesh, offset=step), _iterator_advanced(step), {"step": step})
    ckpt.close()


def test_round_trip_state_metadata_and_iterator(tmp_path, mesh8):
    ckpt = Checkpointer(tmp_path)
    it = _iterator_advanced(7)
    expected_next = next(_iterator_advanced(7))
    state = _state(mesh8)
    expected = jax.tree.map(np.asarray, state)
    metadata = {"step": 7, "rng": [0, 42], "nonfinite": 0, "config": {"optim": {"lr": 3e-4}}}
    ckpt.save(7, state, it, metadata)
    # The train step donates its state: save must have copied the arrays before returning.
    for x in jax.tree.leaves(state):
        x.delete()
    metadata["nonfinite"] = 99
    for _ in range(5):
        next(it)
    ckpt.wait()

    step, restored, meta = ckpt.restore(_abstract(mesh8), it)
    assert step == 7 and ckpt.latest_step() == 7
    assert meta == {"step": 7, "rng": [0, 42], "nonfinite": 0, "config": {"optim": {"lr": 3e-4}}}
    _assert_state_equal(restored, expected)
    assert restored["params"]["w"].sharding == NamedSharding(mesh8, P("fsdp", None))
    assert next(it) == expected_next
    ckpt.close()


def test_restore_empty_directory_returns_none(tmp_path, mesh8):
    ckpt = Checkpointer(tmp_path / "run")
    assert ckpt.latest_step() is None
    assert ckpt.restore(_abstract(mesh8)) is None
    ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_n_removes_only_old_steps(tmp_path, mesh8, async_save):
    _save_steps(tmp_path, mesh8, [1, 2, 3, 4, 5], keep=2, async_save=async_save)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
    ckpt = Checkpointer(tmp_path, keep=2)
    step, restored, meta = ckpt.restore(_abstract(mesh8))
    assert (step, meta) == (5, {"step": 5})
    _assert_state_equal(restored, _state(mesh8, offset=5))
    assert ckpt.restore(_abstract(mesh8), step=4)[0] == 4
    ckpt.close()


def test_same_step_is_saved_once_unless_forced(tmp_path, mesh8):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, _state(mesh8), metadata={"v": 1})
    ckpt.save(3, _state(mesh8), metadata={"v": 2})
    assert ckpt.restore(_abstract(mesh8))[2] == {"v": 1}
    ckpt.save(3, _state(mesh8, offset=1.0), metadata={"v": 3}, force=True)
    _, restored, meta = ckpt.restore(_abstract(mesh8))
    assert meta == {"v": 3}
    _assert_state_equal(restored, _state(mesh8, offset=1.0))
    ckpt.close()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# When one array read fails, orbax leaves its event loop while tensorstore reads of the same
# restore are still pending; their completion callbacks then hit the closed loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [lambda p: p.unlink(), _truncate], ids=["deleted", "truncated"])
def test_corrupt_state_falls_back_to_previous_step(tmp_path, mesh8, capsys, damage):
    _save_steps(tmp_path, mesh8, [1, 2])
    data_files = list((tmp_path / "2" / "state" / "d").iterdir())
    assert data_files
    for path in data_files:
        damage(path)
    ckpt = Checkpointer(tmp_path)
    step, restored, meta = ckpt.restore(_abstract(mesh8))
    assert (step, meta) == (1, {"step": 1})
    _assert_state_equal(restored, _state(mesh8, offset=1))
    warning = capsys.readouterr().err
    assert f"warning: cannot restore the checkpoint of step 2 ({tmp_path / '2'}): " in warning
    assert len(warning.strip().splitlines()) == 1
    ckpt.close()


def test_corrupt_metadata_falls_back_and_is_replaced_by_next_save(tmp_path, mesh8, capsys):
    _save_steps(tmp_path, mesh8, [1, 2])
    (tmp_path / "2" / "metadata" / "metadata").write_text("{not json")
    ckpt = Checkpointer(tmp_path)
    it = _iterator()
    assert ckpt.restore(_abstract(mesh8), it)[0] == 1
    warning = capsys.readouterr().err
    assert str(tmp_path / "2") in warning and "JSON" in warning
    assert next(it) == next(_iterator_advanced(1))
    # Resumed from step 1, the run reaches step 2 again: the unreadable checkpoint is replaced.
    ckpt.save(2, _state(mesh8, offset=20), it, {"step": 2})
    step, restored, meta = ckpt.restore(_abstract(mesh8))
    assert (step, meta) == (2, {"step": 2})
    _assert_state_equal(restored, _state(mesh8, offset=20))
    ckpt.close()


def test_no_readable_checkpoint_raises_and_leaves_iterator(tmp_path, mesh8):
    _save_steps(tmp_path, mesh8, [1, 2])
    for step in ("1", "2"):
        (tmp_path / step / "metadata" / "metadata").write_text("garbage")
    ckpt = Checkpointer(tmp_path)
    it = _iterator_advanced(3)
    with pytest.raises(CheckpointsUnreadable, match=str(tmp_path)):
        ckpt.restore(_abstract(mesh8), it)
    assert next(it) == next(_iterator_advanced(3))
    ckpt.close()


def test_unfinalized_checkpoint_is_ignored(tmp_path, mesh8):
    _save_steps(tmp_path, mesh8, [1, 2])
    # An interrupted save leaves its (possibly complete-looking) temporary directory behind.
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")
    (tmp_path / "3.orbax-checkpoint-tmp" / "metadata" / "metadata").write_text(json.dumps({"step": 3}))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 2
    assert ckpt.restore(_abstract(mesh8))[0] == 2
    ckpt.save(3, _state(mesh8, offset=3), metadata={"step": 3})
    ckpt.wait()
    assert not (tmp_path / "3.orbax-checkpoint-tmp").exists()
    step, restored, _ = ckpt.restore(_abstract(mesh8))
    assert step == 3
    _assert_state_equal(restored, _state(mesh8, offset=3))
    ckpt.close()


@pytest.mark.parametrize("shape", [(1, 1), (1, 4)])
def test_restore_into_another_mesh(tmp_path, mesh8, shape):
    _save_steps(tmp_path, mesh8, [5])
    target = _mesh(shape)
    ckpt = Checkpointer(tmp_path)
    _, restored, _ = ckpt.restore(_abstract(target))
    _assert_state_equal(restored, _state(mesh8, offset=5))
    for leaf, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(_abstract(target))):
        assert leaf.sharding == abstract.sharding
    ckpt.close()
