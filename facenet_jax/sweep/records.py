"""What each cell folder records, read and written safely by several processes at once.

DIR/CELL/sweep_cell.json records what a cell was last started with: the base config path, the
overrides (common, then the cell's) and the resolved config. Every later run compares each
record with what the sweep now gives that cell: if one differs (`base` or `common` changed, or
the base file was edited), the sweep stops before running anything, naming the cells and the
keys, and changes nothing; `--aggregate_only` shows such cells as "stale" rows without their
numbers. A cell folder holding results but no record cannot be checked: it is stale too.

DIR/CELL/sweep_status.json records how the last attempt ended (status, the error's last line,
wall time). Both files are written atomically through a per-writer temporary file
(runfiles.atomic_write_json), so two array tasks, a task and an `--aggregate_only`, or two
machines sharing the folder never see, or leave, a torn record.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from facenet_jax.config import changed_keys, flatten, json_safe, to_plain
from facenet_jax.runfiles import EVAL_FILE, atomic_write_json, read_run_record
from facenet_jax.sweep.spec import cell_config, cell_names
from facenet_jax.sweep.stages import run_sources, source_changes

STATUS_FILE = "sweep_status.json"
CELL_FILE = "sweep_cell.json"  # what the cell was last started with (see cell_record)
LOG_FILE = "train.log"
FAILED_STATUSES = ("crashed", "diverged")


class StaleCellsError(ValueError):
    """Cell folders hold runs of another config than the sweep now gives them."""


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    """A JSON record, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    """Writes a record atomically (several processes may write one sweep folder)."""
    atomic_write_json(path, json_safe(dict(payload)))


def cell_record(base: pathlib.Path, common: Mapping[str, Any], cell: Mapping[str, Any]
                ) -> dict[str, Any]:
    """What a cell runs with, as DIR/CELL/sweep_cell.json records it: the base config path,
    the overrides (common, then the cell's) and the resolved config, in JSON's own types so
    that a record read back compares equal."""
    record = {"base": str(base), "overrides": {**common, **cell},
              "config": to_plain(cell_config(base, common, cell))}
    return json.loads(json.dumps(json_safe(record), default=repr))


def record_changes(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]
                   ) -> list[str]:
    """"KEY was OLD, now NEW" per resolved config key that differs between the record a
    cell's folder was started with and `current`; [] when they match or there is no record.
    The resolved configs are compared, not the overrides: an edited base file counts, a
    moved one or an override restating the base's value does not."""
    if recorded is None:
        return []
    old, new = flatten(recorded["config"]), flatten(current["config"])
    return [f"{key} was {_shown(old, key)}, now {_shown(new, key)}"
            for key in changed_keys(recorded["config"], current["config"], allowed=())]


def _shown(flat: Mapping[str, Any], key: str) -> str:
    return repr(flat[key]) if key in flat else "(absent)"


def stale_error(stale: Mapping[str, Sequence[str]], workdir: pathlib.Path) -> str:
    """The message that stops a sweep whose cell folders hold runs of other configs: the
    cells grouped by what changed, then the ways to go on."""
    groups: dict[str, list[str]] = {}
    for name, changes in stale.items():
        groups.setdefault("; ".join(changes), []).append(name)
    lines = [f"{len(stale)} cell folder(s) in {workdir} hold a run started with another config "
             "than the sweep now gives that cell (its base or common overrides changed, or the "
             "base file was edited). Nothing was run or changed."]
    lines += [f"  {', '.join(names)}: {changes}" for changes, names in groups.items()]
    lines.append(f"To run the sweep as it is now, use a new --workdir, or move those cell folders "
                 f"out of {workdir} (they then run from scratch). To keep their results, restore "
                 "the sweep's base and common. --aggregate_only tabulates them as stale rows.")
    return "\n".join(lines)


def check_records(sweep: Mapping[str, Any], workdir: pathlib.Path,
                  only: Sequence[int] | None = None
                  ) -> dict[str, list[str]]:
    """Stale cells: cell name → what changed since its folder's run was started
    (record_changes), or that a folder holding a result or status has no record to check it
    by; `only`: the run indices to check (all when None). A run started from another run (stages.from_cell) is also stale once
    that run was re-run (stages.source_changes). A cell folder holding a run of another layout
    is refused (runfiles.check_layout)."""
    stale = {}
    names = cell_names(sweep["cells"])
    sources = run_sources(sweep["cells"])
    runs = list(zip(names, sweep["cells"], sources))
    for name, cell, source in (runs if only is None else [runs[i] for i in only]):
        cell_dir = workdir / name
        read_run_record(cell_dir)  # a run folder of another layout: refused (check_layout)
        recorded = read_json(cell_dir / CELL_FILE)
        if recorded is None:
            if (cell_dir / EVAL_FILE).exists() or (cell_dir / STATUS_FILE).exists():
                stale[name] = [f"it holds results but no {CELL_FILE} to check them by"]
            continue
        changes = record_changes(recorded, cell_record(sweep["base"], sweep["common"], cell))
        if source is not None:
            changes += source_changes(recorded, names[source],
                                      workdir / names[source] / EVAL_FILE)
        if changes:
            stale[name] = changes
    return stale


def needs_run(cell_dir: pathlib.Path, rerun_failed: bool) -> bool:
    """Whether a run is still to do: no eval.json, and not recorded as failed (unless
    rerun_failed)."""
    if (cell_dir / EVAL_FILE).exists():
        return False
    failed = (read_json(cell_dir / STATUS_FILE) or {}).get("status") in FAILED_STATUSES
    return rerun_failed or not failed
