"""Two-stage runs in a sweep: a cell that starts from another cell's encoder.

A cell sets `model.init_from` to `from_cell(SOURCE)`, where SOURCE is the other cell's overrides
as the sweep file writes them (without `seed`):

    ARCFACE = {"loss.kind": "classification", "num_steps": 600}
    cells = [ARCFACE, {"model.init_from": from_cell(ARCFACE), "num_steps": 600}]

`from_cell` returns the string "@cell:NAME" (NAME: `cell_name(SOURCE)`, the source's folder
name less its seed part), which a sweep file may also write by hand. At each seed the reference
means the source cell's run *at the same seed*; it is resolved to that run's folder only when
the train command is built, so the records (sweep_cell.json) and the tables keep the reference
and do not depend on where the sweep folder lives. The source must come before the dependent in
the sweep's cells (so run order alone runs it first); `load_sweep` refuses anything else.

Staleness: a dependent's record holds its source run's identity at the moment it started (the
SHA-1 of the source's eval.json: a re-run that trains other weights scores other numbers; a
bit-identical re-run leaves the dependent valid). If the source's eval.json later differs, the
dependent is stale, like a cell whose config changed.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping
from typing import Any

from facenet_jax.sweep.spec import CELL_REFERENCE_PREFIX as REFERENCE_PREFIX
from facenet_jax.sweep.spec import INIT_KEY, SEED_KEY, cell_name
# Where references are resolved to runs: spec, whose load_sweep checks them; public here too.
from facenet_jax.sweep.spec import is_reference, run_sources  # noqa: F401
SOURCE_RECORD_KEY = "source"  # in DIR/CELL/sweep_cell.json: {"run", "eval_sha1"}


class DependencyError(ValueError):
    """A run's source run is not complete, and this invocation does not run it."""


def from_cell(overrides: Mapping[str, Any]) -> str:
    """The `model.init_from` value that starts a cell from the cell with `overrides` (its
    overrides as written in the sweep file, without `seed`): "@cell:NAME"."""
    if SEED_KEY in overrides:
        raise ValueError(f"from_cell({dict(overrides)}): leave out {SEED_KEY!r}; a dependent "
                         "starts from its source's run at its own seed")
    return REFERENCE_PREFIX + cell_name(overrides)


def resolved(overrides: Mapping[str, Any], source_dir: pathlib.Path | None) -> dict[str, Any]:
    """The overrides with a cell reference replaced by the source run's folder."""
    overrides = dict(overrides)
    if source_dir is not None:
        overrides[INIT_KEY] = str(source_dir)
    return overrides


def source_identity(source_eval: pathlib.Path) -> str | None:
    """What identifies the source run's result: the SHA-1 of its eval.json (`source_eval`,
    the path), or None while there is none (the run is not complete)."""
    try:
        return hashlib.sha1(source_eval.read_bytes()).hexdigest()
    except OSError:
        return None


def source_record(source_name: str, source_eval: pathlib.Path) -> dict[str, Any]:
    """The entry a dependent's sweep_cell.json keeps of its source when it starts."""
    return {"run": source_name, "eval_sha1": source_identity(source_eval)}


def source_changes(recorded: Mapping[str, Any] | None, source_name: str,
                   source_eval: pathlib.Path) -> list[str]:
    """["model.init_from's source run NAME was re-run ..."] when the dependent's record names
    another source identity than the source folder now holds, or none (it cannot be checked);
    [] when it matches, when there is no record (not started), or while the source is
    incomplete (it is then to be re-run first; judged again afterwards)."""
    now = source_identity(source_eval)
    if recorded is None or now is None:
        return []
    entry = recorded.get(SOURCE_RECORD_KEY)
    if entry is None:
        return [f"its record names no {INIT_KEY} source run ({source_name}) to check it by"]
    if entry.get("eval_sha1") == now:
        return []
    return [f"{INIT_KEY}'s source run {source_name} was re-run after this run started from it "
            f"(its eval.json was {str(entry.get('eval_sha1'))[:8]}, now {now[:8]})"]


def dependency_error(index: int, name: str, source: int, source_name: str,
                     source_eval: pathlib.Path) -> str:
    """The message of a run asked for (--cell) before its source run is complete."""
    return (f"run {index} ({name}) starts from run {source} ({source_name}), which is not "
            f"complete (no {source_eval}). Run --cell {source} first; in a "
            f"Slurm job array, submit the source runs as one array and the runs that start from "
            f"them as a second with --dependency=afterok:<first array's job id> (docs/sweeps.md)")
