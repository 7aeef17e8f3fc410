"""Checkpoints of one run: train state, grain iterator state and run metadata, saved by orbax.

A checkpoint is the orbax step directory `<directory>/<step>/` holding three items: `state`
(the pytree of arrays, sharded), `data` (the grain iterator's state, one JSON file per process)
and `metadata` (a JSON dict: step, rng key data, counters, the resolved config ...).

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every
item is committed; an interrupted save therefore leaves a temporary directory that is never listed
as a step (the next `Checkpointer` on the directory removes it before its first save).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class CheckpointsUnreadable(RuntimeError):
    """Every checkpoint of a directory failed to restore."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a file size limit, a lost mount): its
    partial directory is removed, and the checkpoints before it are intact."""


class Checkpointer:
    """Async, keep-N orbax checkpoints of one run: train state + grain iterator state + metadata.

    `save` returns once the arrays are copied to host memory (the train step may then donate
    them) and writes in the background; a second `save` first waits for the one in flight, and an
    error of a background save is raised by the next `save`, `wait` or `close`.

    Saving at a step that already has a checkpoint does nothing, unless `force=True` or `restore`
    found that checkpoint unreadable: then the old checkpoint at that step is deleted first and the
    new one written (the older steps remain the fallback meanwhile). Beyond the `keep` newest
    steps, a checkpoint is deleted only once its successor is complete.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).resolve()
        # max_to_keep never deletes a checkpoint before its successor is complete: orbax picks the
        # steps to drop when a save starts, but deletes them in `CheckpointManager._finalize`
        # only after joining the commit (for async saves, the background thread that also renames
        # the temporary directory into place; for sync saves, `save` itself). A failed commit
        # raises out of that join, before the deletion.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )
        self._unreadable_steps: set[int] = set()
        self._in_flight: int | None = None  # the step of an async save not yet known to be written

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any = None,
        metadata: dict | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Starts saving `state` (a pytree of jax.Arrays), the iterator's state and `metadata`.

        `data_iterator` is a grain `DatasetIterator`; its state is read before `save` returns, so
        it may be advanced right away. `metadata` must be JSON-able; it is copied here, so the
        caller may mutate it while the save is in flight.
        """
        # A JSON round trip both copies the dict (orbax serializes it in the background thread)
        # and fails here, in the caller, on a value that JSON cannot hold.
        metadata = json.loads(json.dumps(metadata or {}))
        if step in self._manager.all_steps():
            if not (force or step in self._unreadable_steps):
                logger.info("step %d already has a checkpoint in %s; skipped", step, self.directory)
                return
            self._manager.wait_until_finished()
            self._manager.delete(step)
        items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        # force=True bypasses orbax's own policy, which skips any step <= its latest step; after
        # a fallback restore the run must be able to save steps below an unreadable newer one.
        self._written()  # the save in flight first: its failure is its own
        with self._writing(step):
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unreadable_steps.discard(step)
        self._in_flight = step

    def restore(
        self, abstract_state: Any, data_iterator: Any = None, *, step: int | None = None, partial: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint (or exactly `step`); None if there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` whose `.sharding` says where each
        restored array goes, whatever mesh the checkpoint was saved from. partial=True: it is a
        part of the saved state (the same tree with some subtrees left out, e.g. the model of a
        (model, optimizer) state), and only its arrays are read. `data_iterator`, if
        given, is set to the saved iterator state in place. A checkpoint that fails to restore is
        reported with a warning and the previous step is tried; if none can be restored, a
        CheckpointsUnreadable names the directory and every failure, and the iterator is left unchanged.
        Returns `(step, state, metadata)`.
        """
        self._manager.wait_until_finished()  # a step still being written is listed already
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory} (steps: {sorted(steps)})"
                )
            steps = [step]
        if not steps:
            return None
        if partial:
            state = ocp.args.PyTreeRestore(abstract_state, partial_restore=True,
                                           restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            state = ocp.args.StandardRestore(abstract_state)
        items = {"state": state, "metadata": ocp.args.JsonRestore()}
        if data_iterator is not None:
            data_state = data_iterator.get_state()
        failures = []
        for i, candidate in enumerate(steps):
            path = self.directory / str(candidate)
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
                if data_iterator is not None:
                    data_iterator.set_state(_saved_iterator_state(path / "data"))
            except Exception as err:  # any unreadable item makes the whole checkpoint unusable
                # The first line only: tensorstore's errors carry a page of spec after it.
                failure = f"step {candidate} ({path}): {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                print(f"seqmix: warning: cannot restore the checkpoint of {failure}; "
                      f"{'trying the one before' if i + 1 < len(steps) else 'no older one left'}", file=sys.stderr)
                failures.append(failure)
                continue
            self._unreadable_steps.update(steps[:i])
            return candidate, restored["state"], dict(restored["metadata"])
        if data_iterator is not None:
            data_iterator.set_state(data_state)
        raise CheckpointsUnreadable(f"no checkpoint in {self.directory} could be restored ({'; '.join(failures)}); "
                                    "remove them to start over, or choose another out_dir")

    def newest_metadata(self) -> dict | None:
        """The metadata saved with the newest checkpoint, read without its state (to check a
        resume before restoring arrays of other shapes); None if there is none or it is unreadable
        (`restore` then reports and skips that checkpoint)."""
        self._manager.wait_until_finished()
        step = self.latest_step()
        if step is None:
            return None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        except Exception:  # a corrupt checkpoint: `restore` reports it
            return None
        return dict(restored["metadata"])

    def latest_step(self) -> int | None:
        """The newest step in the directory (including a save still in flight), or None."""
        return max(self._manager.all_steps(), default=None)

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is written and older checkpoints pruned;
        CheckpointWriteFailed if it could not be written."""
        self._written()

    def close(self) -> None:
        """Waits for the save in flight and releases orbax's threads (CheckpointWriteFailed as
        `wait`, after releasing them)."""
        try:
            self._written()
        finally:
            self._manager.close()

    def _written(self) -> None:
        step, self._in_flight = self._in_flight, None
        with self._writing(step):
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns orbax's error for a checkpoint it could not write into CheckpointWriteFailed with
        the OS's reason (`_os_reason`) or else the cause's first line, after removing the partial
        directory, which on a full disk holds the space the next save needs."""
        try:
            yield
        except Exception as err:
            shutil.rmtree(self.directory / f"{step}.orbax-checkpoint-tmp", ignore_errors=True)
            message = str(err).strip()
            cause = message.splitlines()[0] if message else type(err).__name__
            complete = [saved for saved in self._manager.all_steps() if saved != step]
            raise CheckpointWriteFailed(
                f"the checkpoint of step {step} could not be written in {self.directory}: "
                f"{_os_reason(message) or cause[:300]}; "
                + (f"the checkpoint of step {max(complete)} is the newest complete one" if complete else
                   "no complete checkpoint exists")) from None


def _os_reason(message: str) -> str | None:
    """The OS's reason in a tensorstore error, e.g. "No space left on device": the first of the
    OS's error descriptions (`os.strerror`) the message holds, wherever its wording puts it (most
    paths write ": REASON [os_error_code=...]", on the first line or, when the file it names runs
    over lines, a later one; a zarr array's metadata written into the OCDBT database words it
    otherwise)."""
    found = [(message.find(text), text) for text in map(os.strerror, errno.errorcode) if text in message]
    return min(found)[1] if found else None


def _saved_iterator_state(directory: Path) -> dict:
    """The grain iterator state in a checkpoint's `data` item: this process's file, or, for a
    run saved with another number of processes, any process's. The input pipeline makes every
    process iterate the same global batches (`make_dataset`), so all files hold the same state."""
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    files = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"{directory}: no data iterator state (process_*-of-*.json)")
    return json.loads(files[0].read_text())
