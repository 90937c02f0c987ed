"""Checkpoints with orbax: one folder per step under DIR/checkpoints, written atomically.

Saves are synchronous: orbax writes into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and the torn folder is removed
at the next start. Restore walks back from the newest step when one fails to load.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / "checkpoints"


def make_manager(workdir: str | pathlib.Path, *, max_to_keep: int,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int] | None:
    """Restores the newest loadable checkpoint into `target`'s structure and shardings.

    Returns (state, step), or None when there is no checkpoint. A checkpoint that fails to load
    is skipped with a warning naming it, and the previous one is tried.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:  # noqa: BLE001 - any failure means: try the previous one
            message = (f"checkpoint at step {step} in {manager.directory} failed to restore "
                       f"({type(error).__name__}: {str(error)[:300]}); trying the previous one")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logging.warning(message)
            continue
        return state, step
    if steps:
        raise RuntimeError(
            f"none of the checkpoints {steps} in {manager.directory} could be restored; move "
            "the folder aside to start afresh")
    return None
