"""Checkpoints with orbax: one folder per step under DIR/checkpoints, written atomically.

Saves are synchronous: orbax writes into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and the torn folder is removed
at the next start. Restore walks back from the newest step when one fails to load; when the
resumed run reaches such a step again, the unreadable folder is moved to
DIR/unreadable_checkpoints/ (kept for inspection, never deleted) before the new save.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from facenet_jax.runfiles import CHECKPOINT_DIR

UNREADABLE_DIR = "unreadable_checkpoints"
# Headroom over the raw array bytes for orbax's metadata files (measured: ~52 KB per save).
_METADATA_BYTES = 1 << 16


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the step and what is still intact."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / CHECKPOINT_DIR


def make_manager(workdir: str | pathlib.Path, *, max_to_keep: int,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax manager of DIR/checkpoints. read_only=True (every load: evaluate, embed,
    verify) writes and prunes nothing, and says nothing about it: orbax warns three times per
    manager that a read-only one saves nothing, which is what was asked."""
    # A read-only manager keeps every step and saves at no interval; saying so up front avoids
    # orbax's two warnings that it changed these options.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    with _dropping_log_records("absl", _READ_ONLY_NOTICE if read_only else None):
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


# The start of the warning orbax's CheckpointManager logs (through absl) for every read-only one.
_READ_ONLY_NOTICE = "Given directory is read only"


class _MessagePrefixFilter(logging.Filter):
    """Drops the records whose unformatted message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _dropping_log_records(logger: str, prefix: str | None) -> Iterator[None]:
    """Within the block, `logger` drops records starting with `prefix` (None: drops none);
    every other record, and everything after the block, is logged as usual."""
    if prefix is None:
        yield
        return
    dropped = _MessagePrefixFilter(prefix)
    logging.getLogger(logger).addFilter(dropped)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(dropped)


def latest_step(workdir: str | pathlib.Path) -> int | None:
    """The newest complete checkpoint's step in DIR (not restored: cheap, no arrays read)."""
    if not checkpoint_dir(workdir).is_dir():
        return None
    return make_manager(workdir, max_to_keep=1, read_only=True).latest_step()


def checkpoint_bytes(state: Any) -> int:
    """About how many bytes one checkpoint of `state` takes on disk (arrays + metadata).

    The leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so the check
    can run before anything is computed.
    """
    return _METADATA_BYTES + sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                                 for leaf in jax.tree.leaves(state))


def _shortage(directory: pathlib.Path, state: Any) -> str | None:
    """What is missing for one more checkpoint of `state` in `directory`, or None if it fits."""
    needed = checkpoint_bytes(state)
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return None
    return (f"{directory} has {free / 2**20:.1f} MiB free but one checkpoint needs about "
            f"{needed / 2**20:.1f} MiB")


def check_free_space(workdir: str | pathlib.Path, state: Any) -> None:
    """OSError when DIR cannot hold one more checkpoint of `state` (arrays or shapes)."""
    shortage = _shortage(pathlib.Path(workdir), state)
    if shortage:
        raise OSError(f"workdir {shortage} (keep_checkpoints of them are kept); free space "
                      "there or choose another --workdir")


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Writes step's checkpoint; CheckpointSaveError (naming what is intact) if it fails.

    The free space is checked first, so a full disk stops the run before a write is torn.
    Any folder already at a step >= `step` is one that failed to restore (the run resumed from
    the newest loadable checkpoint below it): it is moved aside first, so orbax neither refuses
    the step nor keeps the broken folder in place of a good one when pruning old steps.
    """
    directory = pathlib.Path(manager.directory)
    shortage = _shortage(directory, state)
    if shortage:
        raise _save_error(step, directory, shortage)
    _set_aside(manager, [s for s in manager.all_steps() if s >= step])
    # Both lines bracket the write: a log that ends between them was cut off mid-save.
    logging.info("writing the checkpoint of step %d", step)
    try:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
        logging.info("checkpoint of step %d complete", step)
    except Exception as error:  # noqa: BLE001 - orbax raises ValueError, OSError, ...
        # The manager itself may fail after a failed write (seen: "Event loop is closed" from
        # reload()); that must not replace this message, so what is intact is read from disk.
        _close_quietly(manager)
        raise _save_error(step, directory, _first_line(error)) from error


def _save_error(step: int, directory: pathlib.Path, reason: str) -> CheckpointSaveError:
    intact = complete_steps(directory)
    return CheckpointSaveError(
        f"could not write the checkpoint of step {step} to {directory} ({reason}). Checkpoints "
        f"still intact: {intact or 'none'}. Free space or fix permissions there, then re-run "
        "the same command to resume from the newest of them")


def complete_steps(directory: str | pathlib.Path) -> list[int]:
    """Steps whose checkpoint folder under `directory` is complete, oldest first.

    orbax writes into STEP.orbax-checkpoint-tmp and renames it to STEP when the write is done,
    so a plain integer name is a finished checkpoint.
    """
    folder = pathlib.Path(directory)
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()) if (
        folder.is_dir()) else []


def _close_quietly(manager: ocp.CheckpointManager) -> None:
    """Stops the manager's writer threads after a failed save, so their pending coroutines do
    not print pages of shutdown tracebacks below the error; a failure to close is only logged."""
    try:
        manager.close()
    except Exception as error:  # noqa: BLE001 - the save error is the one to report
        logging.warning("closing the checkpoint manager after a failed save: %s",
                        _first_line(error))


def restore_latest(manager: ocp.CheckpointManager, target: Any, *,
                   partial: bool = False) -> tuple[Any, int] | None:
    """Restores the newest loadable checkpoint into `target`'s structure and shardings.

    Returns (state, step), or None when there is no checkpoint. A checkpoint that fails to load
    is skipped with a warning naming it, and the previous one is tried. partial=True: `target`
    is a dict of some of the saved state's fields (e.g. {"params", "batch_stats"}): only those
    are read, e.g. an encoder without its class centres.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            state = (_restore_fields(_item_path(manager.directory, step), target)
                     if partial else manager.restore(step, args=ocp.args.StandardRestore(target)))
        except Exception as error:  # noqa: BLE001 - any failure means: try the previous one
            message = (f"checkpoint at step {step} in {manager.directory} failed to restore "
                       f"({type(error).__name__}: {_first_line(error)}); trying the previous "
                       "one")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logging.warning(message)
            continue
        return state, step
    if steps:
        raise RuntimeError(
            f"none of the checkpoints {steps} in {manager.directory} could be restored; move "
            "the folder aside to start afresh")
    return None


def _item_path(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    """Where the manager writes step's state (its one item, "default") under `directory`."""
    return pathlib.Path(directory) / str(step) / "default"


def _restore_fields(path: pathlib.Path, target: dict[str, Any]) -> dict[str, Any]:
    """The fields of `target` (arrays or shape structs with shardings) from the saved state
    at `path`, leaving the others unread."""
    restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding),
                                target)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))


def read_arrays(workdir: str | pathlib.Path, step: int,
                fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every array of step's checkpoint as host numpy, keyed by its tree path ("params/...");
    with `fields`, only those subtrees of the saved state, each a field or a path below one
    ("params/encoder"; absent ones skipped), the others left unread (e.g. an encoder without
    its optimizer state and class centres).

    Needs no config, model or devices (no target structure): for comparing two runs bit for
    bit, e.g. a run killed and resumed many times against an uninterrupted one.
    """
    path = _item_path(checkpoint_dir(workdir), step)
    if not path.is_dir():
        raise FileNotFoundError(f"no complete checkpoint of step {step} at {path}")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    if fields is not None:
        tree = _subtrees(tree, fields)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    arrays = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args, partial_restore=fields is not None))
    return {jax.tree_util.keystr(key, simple=True, separator="/"): value
            for key, value in jax.tree.leaves_with_path(arrays)}


def _subtrees(tree: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The part of a nested dict `tree` under each "a/b" path, nested as in `tree`; a path
    that is absent is skipped."""
    kept: dict[str, Any] = {}
    for path in paths:
        parts, node = path.split("/"), tree
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        into = kept
        for part in parts[:-1]:
            into = into.setdefault(part, {})
        into[parts[-1]] = node
    return kept


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves the given step folders to DIR/unreadable_checkpoints/ (process 0 moves)."""
    if not steps:
        return
    if jax.process_index() == 0:
        aside = pathlib.Path(manager.directory).parent / UNREADABLE_DIR
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            shutil.move(pathlib.Path(manager.directory) / str(step), target)
            logging.warning("moved the unreadable checkpoint of step %d to %s", step, target)
    ocp.multihost.sync_global_processes(f"facenet_jax_set_aside_{'_'.join(map(str, steps))}")
    manager.reload()


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else "")[:limit]
