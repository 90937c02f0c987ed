"""Sweeps: run a grid of config overrides cell by cell, then tabulate and plot the results.

    python -m facenet_jax.sweep --sweep experiments/sweeps/FILE.py --workdir DIR
        [--print_commands] [--aggregate_only] [--rerun_failed]

A sweep file's `get_sweep()` returns a dict (or ConfigDict) with
- `base`: the config file every cell starts from: absolute, or relative to the sweep file's
  folder, or (if not found there) relative to the repository root;
- `cells`: a list of dicts of dotted overrides, one per run (`grid(...)` builds products);
- optionally `common`: overrides applied to every cell (e.g. a shorter `num_steps`), left out of
  the cell names and columns but passed on every command line;
- optionally `name`: a title for the results.

Each cell runs as `python -m facenet_jax.train --config BASE --workdir DIR/CELL --config.K=V ...`
in a subprocess, one after another. A subprocess per cell costs a few seconds of start-up
against minutes of training and buys: a crash (or an out-of-memory kill) ends one cell, not the
sweep; each cell's compiled programs and datasets are freed; and the command run is exactly the
one `--print_commands` prints, with the train CLI's own parsing and type checks.

Before a cell runs, DIR/CELL/sweep_cell.json records what it runs with: the base config path,
the overrides (common, then the cell's) and the resolved config. Every later run compares each
record with what the sweep now gives that cell: if one differs (`base` or `common` changed, or
the base file was edited), the sweep stops before running anything, naming the cells and the
keys, and changes nothing; `--aggregate_only` shows such cells as "stale" rows without their
numbers. Cells run before records were kept are assumed to match (a line says so).

A cell whose `eval.json` exists is finished and skipped. A cell that crashed or diverged is
recorded in DIR/CELL/sweep_status.json (status, the error's last line, wall time) and becomes a
row saying so; it is not re-run unless `--rerun_failed` is given (re-running resumes from its
last checkpoint). A cell whose train process exited 0 without eval.json (the train CLI does so
after saving a checkpoint on SIGTERM) is recorded as "preempted", and the next plain run
resumes it. Each attempt's stdout and stderr stream into DIR/CELL/train.log as it runs, after a
line naming the attempt and its start time (earlier attempts' output is kept). Results go to
DIR/results.csv, DIR/results.md and the PNG plots.

Collapse rule (`is_collapsed`): `facenet_jax.collapse`, the one implementation the train loop's
warning uses too. A collapsed embedding can still order some pairs correctly, so a collapsed cell
may score well above chance: the flag says how it got there.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import pathlib
import re
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import ml_collections

from facenet_jax.collapse import (COLLAPSE_LOSS_RTOL, COLLAPSE_RADIUS, COLLAPSE_SPREAD_OF_MARGIN,
                                  COLLAPSE_WINDOW, is_collapsed)
from facenet_jax.config import changed_keys, flatten, json_safe, load_config, to_plain
from facenet_jax.logs import read_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EVAL_FILE = "eval.json"  # the train CLI's end-of-run evaluation (facenet_jax.evaluate)
STATUS_FILE = "sweep_status.json"
CELL_FILE = "sweep_cell.json"  # what the cell was last started with (see cell_record)
LOG_FILE = "train.log"
ATTEMPT_MARK = "===== sweep attempt"  # opens each attempt's output in train.log
BASELINE_DIR = "pixel_baselines"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
ACCURACY_PLOT = "accuracy_vs_margin.png"
ACTIVE_PLOT = "active_fraction.png"
SWEEP_KEYS = {"base", "cells", "common", "name"}
ALWAYS_COLUMNS = ("loss.margin", "loss.distance", "loss.strategy")
METRIC_COLUMNS = ("accuracy", "accuracy_std", "val@far=1e-3", "auc", "final_loss",
                  "final_active_fraction", "final_embedding_spread", "collapsed", "wall_s",
                  "status", "error", "pixel_accuracy")
_MAX_NAME = 120
_OUTPUT_TAIL = 64 * 1024  # bytes of an attempt's output read back to diagnose it
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._+-]+$")


# ----------------------------------------------------------------------------------------------
# Sweep files and cells (pure).


def grid(axes: Mapping[str, Sequence[Any]], *, seeds: Sequence[int] | None = None
         ) -> list[dict[str, Any]]:
    """The product of value lists, first key slowest: {"a": [1, 2], "b": [3]} → [{a:1,b:3},
    {a:2,b:3}]; with `seeds`, each combination once per seed (key "seed", varied fastest)."""
    axes = dict(axes)
    if seeds is not None:
        axes["seed"] = list(seeds)
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not len(values):
            raise ValueError(f"grid axis {key!r} needs a non-empty list of values, got "
                             f"{values!r}")
    keys = list(axes)
    return [dict(zip(keys, combination)) for combination in itertools.product(*axes.values())]


def load_sweep(path: str | pathlib.Path) -> dict[str, Any]:
    """Runs the sweep file's `get_sweep()`; checks its keys and cells and resolves `base`.

    Returns {"name", "base" (absolute Path), "cells" (list of dicts), "common" (dict)}.
    """
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    spec = runpy.run_path(str(path)).get("get_sweep")
    if spec is None:
        raise ValueError(f"sweep file {path} defines no get_sweep()")
    spec = spec()
    spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    unknown = set(spec) - SWEEP_KEYS
    missing = {"base", "cells"} - set(spec)
    if unknown or missing:
        raise ValueError(f"{path}: get_sweep() must return keys base, cells (and optionally "
                         f"common, name); unknown: {sorted(unknown)}, missing: {sorted(missing)}")
    cells = [dict(cell) for cell in spec["cells"]]
    if not cells:
        raise ValueError(f"{path}: the sweep has no cells")
    common = dict(spec.get("common") or {})
    for cell in [common, *cells]:
        for key in cell:
            if not isinstance(key, str) or not key:
                raise ValueError(f"{path}: override keys must be dotted strings, got {key!r}")
    duplicates = _duplicates(_canonical(cell) for cell in cells)
    if duplicates:
        raise ValueError(f"{path}: cells repeat the same overrides: {duplicates[:3]}; remove "
                         "the repeats (add a seed to repeat a run)")
    return {"name": spec.get("name") or path.stem, "base": resolve_base(spec["base"], path),
            "cells": cells, "common": common}


def resolve_base(base: str, sweep_path: pathlib.Path) -> pathlib.Path:
    """`base` as written in the sweep file → an existing absolute config path."""
    candidates = [pathlib.Path(base)] if pathlib.Path(base).is_absolute() else [
        sweep_path.parent / base, REPO_ROOT / base]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"sweep base config {base!r} not found (looked at "
                            f"{', '.join(map(str, candidates))})")


def cell_names(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable, filesystem-safe, unique folder names, one per cell (see `cell_name`); names
    that would still coincide get a hash of their overrides appended."""
    names = [cell_name(cell) for cell in cells]
    repeated = set(_duplicates(names))
    return [f"{name}_{_digest(cell)}" if name in repeated else name
            for name, cell in zip(names, cells)]


def cell_name(overrides: Mapping[str, Any]) -> str:
    """{"loss.margin": 0.2, "loss.strategy": "semihard"} → "margin-0.2__strategy-semihard".

    Keys sorted (so the name does not depend on dict order), each shown by its last component
    unless two keys of the cell share it. A value with characters outside [A-Za-z0-9._+-] or
    with "__" (or a name over 120 characters) is made safe and the name gets a hash of the
    overrides, so no two different cells can share a name. No overrides: "base".
    """
    if not overrides:
        return "base"
    keys = sorted(overrides)
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    shared = set(_duplicates(leaves))
    parts, lossy = [], False
    for key, leaf in zip(keys, leaves):
        text = format_value(overrides[key])
        if not _SAFE_VALUE.match(text) or "__" in text:
            text, lossy = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_"), True
        parts.append(f"{key if leaf in shared else leaf}-{text}")
    name = "__".join(parts)
    if lossy or len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME]}_{_digest(overrides)}"
    return name


def format_value(value: Any) -> str:
    """An override as the train CLI parses it: strings raw, everything else its repr."""
    if value is None:
        raise ValueError("an override cannot be None (the command line cannot express it)")
    return value if isinstance(value, str) else repr(value)


def train_command(base: pathlib.Path, workdir: pathlib.Path, overrides: Mapping[str, Any],
                  python: str = "python") -> list[str]:
    """The argv that trains one cell (overrides in order; later ones win)."""
    return [python, "-m", "facenet_jax.train", "--config", str(base), "--workdir",
            str(workdir), *(f"--config.{k}={format_value(v)}" for k, v in overrides.items())]


def cell_config(base: pathlib.Path, common: Mapping[str, Any], cell: Mapping[str, Any]
                ) -> ml_collections.ConfigDict:
    """The config a cell trains with (raises naming an unknown key or a wrong type)."""
    return load_config(base, {**common, **cell})


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


def _canonical(overrides: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(dict(overrides)), sort_keys=True, default=repr)


def _digest(overrides: Mapping[str, Any]) -> str:
    return hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]


def _duplicates(items: Iterable[str]) -> list[str]:
    seen, repeated = set(), []
    for item in items:
        if item in seen and item not in repeated:
            repeated.append(item)
        seen.add(item)
    return repeated


# ----------------------------------------------------------------------------------------------
# Collapse and result rows (pure).


def result_row(keys: Sequence[str], config: Mapping[str, Any],
               evaluation: Mapping[str, Any] | None, metrics: Sequence[Mapping[str, Any]],
               status_record: Mapping[str, Any] | None, pixel_accuracy: float | None
               ) -> dict[str, Any]:
    """One table row from a cell's plain config, eval.json, metrics and status.

    keys: the config columns (dotted), read from the cell's config, so a key that only some
    cells override still has its value in every row. status: "ok" (eval.json exists), else the
    recorded "crashed"/"diverged"/"preempted" (or "stale", see aggregate), else "pending".
    """
    flat = flatten(config)
    train_rows = [row for row in metrics if "loss" in row]
    last = train_rows[-1] if train_rows else {}
    row = {key: flat.get(key) for key in keys}
    status_record = status_record or {}
    if evaluation is not None:
        status, error = "ok", None
    else:
        status, error = status_record.get("status", "pending"), status_record.get("error")
    evaluation = evaluation or {}
    row.update({
        "accuracy": evaluation.get("accuracy"),
        "accuracy_std": evaluation.get("accuracy_std"),
        "val@far=1e-3": evaluation.get("val@far=1e-3"),
        "auc": evaluation.get("auc"),
        "final_loss": last.get("loss"),
        "final_active_fraction": last.get("active_fraction"),
        "final_embedding_spread": last.get("embedding_spread"),
        "collapsed": is_collapsed(train_rows, margin=flat.get("loss.margin", 0.0),
                                  distance=flat.get("loss.distance", "squared"),
                                  soft=bool(flat.get("loss.soft"))),
        "wall_s": status_record.get("wall_s"),
        "status": status,
        "error": error,
        "pixel_accuracy": pixel_accuracy,
    })
    return row


def table_columns(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Overridden keys (first-seen order), then the always-present loss keys, then metrics."""
    columns: list[str] = []
    for key in itertools.chain(*(cell.keys() for cell in cells), ALWAYS_COLUMNS):
        if key not in columns:
            columns.append(key)
    return columns + list(METRIC_COLUMNS)


def diagnose_failure(returncode: int, stderr: str) -> tuple[str, str]:
    """(status, last line) of a failed train process: "diverged" for a non-finite loss,
    "crashed" otherwise (signals included)."""
    last = _last_line(stderr) or f"exit status {returncode} with no error output"
    if returncode < 0:
        last = f"killed by signal {-returncode}; {last}"
    status = "diverged" if "NonFiniteLossError" in stderr else "crashed"
    return status, last


def cell_outcome(returncode: int, finished: bool, output: str) -> tuple[str, str | None]:
    """(status, error) of one attempt at a cell from its exit status, whether eval.json
    exists, and its output: "ok"; "preempted" for exit 0 without eval.json (the train CLI's
    exit after saving a checkpoint on SIGTERM: a re-run resumes it); else diagnose_failure."""
    if returncode == 0 and finished:
        return "ok", None
    if returncode == 0:
        last = _last_line(output)
        return "preempted", ("exited 0 without writing eval.json; the next sweep run resumes it"
                             + (f" (last output: {last})" if last else ""))
    return diagnose_failure(returncode, output)


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def attempt_header(attempt: int, started: str, command: Sequence[str]) -> str:
    """The line that opens one attempt's output in a cell's train.log."""
    return f"{ATTEMPT_MARK} {attempt}, started {started}: {shlex.join(command)} =====\n"


def attempts_logged(log_text: str) -> int:
    """How many attempts a cell's train.log holds (those logged with an attempt_header)."""
    return sum(line.startswith(ATTEMPT_MARK) for line in log_text.splitlines())


# ----------------------------------------------------------------------------------------------
# Tables and plots (files).


def _format_cell(column: str, row: Mapping[str, Any]) -> str:
    value = row.get(column)
    if column == "accuracy" and value is not None and row.get("accuracy_std") is not None:
        return f"{value:.4f} ± {row['accuracy_std']:.4f}"
    if value is None:
        return "—" if column != "error" else ""
    if column == "wall_s":
        return f"{value:.0f}"
    if column == "collapsed":
        return "**yes**" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if column in ("loss.margin",) else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
              path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a markdown table (accuracy shown as mean ± std; the std column folded in)."""
    shown = [c for c in columns if c != "accuracy_std"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_format_cell(c, row) for c in shown) + " |" for row in rows]
    return "\n".join(lines)


# Statuses the count line names only when some cell has them.
_RARE_STATUSES = {"preempted": "the next sweep run resumes them",
                  "stale": "their folders hold runs of another config; see error"}


def write_markdown(sweep: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str], baselines: Mapping[str, Any],
                   path: pathlib.Path) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "crashed", "diverged",
                                                                "pending", *_RARE_STATUSES)}
    rare = "".join(f", {counts[s]} {s} ({meaning})" for s, meaning in _RARE_STATUSES.items()
                   if counts[s])
    common = ", ".join(f"`{k}={format_value(v)}`" for k, v in sweep["common"].items()) or "none"
    base = sweep["base"]
    base_text = base.relative_to(REPO_ROOT) if base.is_relative_to(REPO_ROOT) else base
    lines = [
        f"# Sweep `{sweep['name']}`", "",
        f"Base config `{base_text}`; common overrides: {common}.  ",
        f"{len(rows)} cells: {counts['ok']} finished, {counts['crashed']} crashed, "
        f"{counts['diverged']} diverged, {counts['pending']} not run{rare}.", "",
        "accuracy: 10-fold verification accuracy ± std over folds on held-out identities; "
        "val@far=1e-3: true-accept rate at false-accept rate 1e-3; auc: ROC AUC; final_*: the "
        "last training log row (a mean over `log_every` steps); embedding spread is the mean "
        "pairwise distance in the loss's distance. "
        f"collapsed: over the last {COLLAPSE_WINDOW} log rows, embedding spread below that of "
        f"unit vectors {COLLAPSE_RADIUS:g} apart (squared {COLLAPSE_RADIUS ** 2:g}, euclidean "
        f"{COLLAPSE_RADIUS:g}) or, with the hinge, below {COLLAPSE_SPREAD_OF_MARGIN:g}·α; or "
        f"loss within {COLLAPSE_LOSS_RTOL:g}·α of α (of ln 2 with the soft margin); a collapsed "
        "cell can still score above chance. pixel_accuracy: the raw-pixel baseline on the same "
        "test pairs. wall_s: the cell's wall time here, compile and evaluation included.", "",
        markdown_table(rows, columns), "",
    ]
    for key, baseline in baselines.items():
        if baseline is not None:
            lines.append(f"Pixel baseline `{key}`: accuracy {baseline['accuracy']:.4f} ± "
                         f"{baseline['accuracy_std']:.4f}, AUC {baseline['auc']:.4f}.")
    path.write_text("\n".join(lines) + "\n")


def _series_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" if k != "loss.strategy" else
                     str(row[k]) for k in keys) or "all"


def _series_keys(columns: Sequence[str]) -> list[str]:
    """Overridden keys other than margin, distance and seed: what tells the lines apart."""
    metric = set(METRIC_COLUMNS)
    keys = [c for c in columns if c not in metric and c not in ("loss.margin", "loss.distance",
                                                                "seed")]
    return [k for k in keys if k != "loss.strategy"] + ["loss.strategy"]


def plot_accuracy(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  path: pathlib.Path) -> pathlib.Path:
    """Accuracy against α (log x), one line per strategy, one panel per distance; seeds
    averaged; collapsed cells marked ×; the pixel baseline dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r["accuracy"] is not None]
    distances = _in_order(r["loss.distance"] for r in rows)
    keys = _series_keys(columns)
    labels = _in_order(_series_label(r, keys) for r in rows)
    colors, styles = _line_styles(labels)
    width = 5.5 * len(distances) + _LEGEND_WIDTH
    fig, axes = plt.subplots(1, len(distances), figsize=(width, 4.2),
                             sharey=True, squeeze=False)
    for ax, distance in zip(axes[0], distances):
        for label in labels:
            points = [r for r in done
                      if r["loss.distance"] == distance and _series_label(r, keys) == label]
            if not points:
                continue
            margins = sorted({r["loss.margin"] for r in points})
            mean = [_mean(r["accuracy"] for r in points if r["loss.margin"] == m)
                    for m in margins]
            ax.plot(margins, mean, marker="o", ls=styles[label], color=colors[label],
                    label=label, lw=1.5, ms=4)
            collapsed = [(r["loss.margin"], r["accuracy"]) for r in points if r["collapsed"]]
            if collapsed:
                ax.plot(*zip(*collapsed), "x", color=colors[label], ms=10, mew=2)
        baselines = {r["pixel_accuracy"] for r in rows
                     if r["loss.distance"] == distance and r["pixel_accuracy"] is not None}
        for baseline in baselines:
            ax.axhline(baseline, color="gray", ls="--", lw=1)
        if baselines:
            ax.text(0.01, min(baselines), " pixels", color="gray", va="bottom",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel(f"margin α ({distance} distance)")
        ax.set_title(f"distance = {distance}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("10-fold verification accuracy")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    handles.append(plt.Line2D([], [], color="k", marker="x", ls="", ms=8, mew=2))
    names.append("collapsed")
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_WIDTH / width, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_active_fraction(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                         histories: Mapping[str, Sequence[Mapping[str, Any]]],
                         path: pathlib.Path) -> pathlib.Path:
    """Active-triplet fraction over training: a panel per (distance, α), a line per strategy
    (first seed only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _series_keys(columns)
    labels = _in_order(_series_label(r, keys) for r in rows)
    colors, styles = _line_styles(labels)
    distances = _in_order(r["loss.distance"] for r in rows)
    margins = sorted({r["loss.margin"] for r in rows})
    width = 2.9 * len(margins) + _LEGEND_WIDTH
    fig, axes = plt.subplots(len(distances), len(margins),
                             figsize=(width, 2.5 * len(distances) + 0.4),
                             sharex=True, sharey=True, squeeze=False)
    for i, distance in enumerate(distances):
        for j, margin in enumerate(margins):
            ax = axes[i][j]
            drawn = set()
            for row in rows:
                label = _series_label(row, keys)
                if (row["loss.distance"], row["loss.margin"]) != (distance, margin) or (
                        label in drawn):
                    continue
                history = [h for h in histories.get(row["name"], ())
                           if h.get("active_fraction") is not None]
                if history:
                    drawn.add(label)
                    ax.plot([h["step"] for h in history],
                            [h["active_fraction"] for h in history],
                            color=colors[label], ls=styles[label], lw=1.6, label=label)
            ax.set_title(f"{distance}, α={margin:g}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == len(distances) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("active fraction")
    handles = [plt.Line2D([], [], color=colors[label], ls=styles[label], lw=2)
               for label in labels]
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_WIDTH / width, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_LEGEND_WIDTH = 2.0  # inches right of the panels for the figure legend


def _line_styles(labels: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A colour and a dash pattern per series: series that coincide (e.g. several strategies
    with every triplet active) stay visible as dashes over one another."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    dashes = ("-", "--", "-.", ":")
    return ({label: colors[i % len(colors)] for i, label in enumerate(labels)},
            {label: dashes[i % len(dashes)] for i, label in enumerate(labels)})


def _in_order(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-seen order (the sweep's own order for legends and panels)."""
    return list(dict.fromkeys(values))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------------
# Running and aggregating (effects).


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(dict(payload)), indent=2))
    os.replace(tmp, path)


def plan(sweep: Mapping[str, Any], workdir: pathlib.Path
         ) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, overrides, command) per cell; loads every cell's config first, so an unknown
    key or a wrong type fails before anything runs."""
    workdir = workdir.resolve()
    planned = []
    for name, cell in zip(cell_names(sweep["cells"]), sweep["cells"]):
        try:
            cell_config(sweep["base"], sweep["common"], cell)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"sweep cell {name} ({cell}): {error}") from error
        command = train_command(sweep["base"], workdir / name, {**sweep["common"], **cell})
        planned.append((name, cell, command))
    return planned


class CellRunner:
    """Runs cell processes; inside `with`, SIGTERM to the sweep is passed on to the running
    cell, whose train CLI saves a checkpoint and exits (recorded as preempted), and
    `stop_requested` tells the sweep not to start another cell. Without this the cell would
    run on as an orphan of a preempted sweep. The handler is installed from the main thread
    only (where Python delivers signals)."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._child: subprocess.Popen | None = None
        self._previous: Any = None

    def __enter__(self) -> "CellRunner":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _forward(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> int:
        """Runs argv to completion; its return code."""
        self._child = subprocess.Popen(argv, **popen_kwargs)
        try:
            return self._child.wait()
        finally:
            self._child = None


def run_cell(command: Sequence[str], cell_dir: pathlib.Path, env: Mapping[str, str] | None,
             runner: CellRunner | None = None) -> dict[str, Any]:
    """Runs one train command, its stdout and stderr appended to DIR/CELL/train.log while it
    runs (after an attempt_header); returns and writes its status record: {"status", "error",
    "wall_s", "returncode"}. `runner` passes a sweep's SIGTERM on to the cell."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    log_path = cell_dir / LOG_FILE
    earlier = log_path.read_text(errors="replace") if log_path.exists() else ""
    argv = [sys.executable, *command[1:]]
    start = time.perf_counter()
    # Straight into the file, not through a pipe: `tail -f` follows the cell, and a killed
    # sweep still leaves the log. Appending keeps an earlier (failed) attempt's log.
    with log_path.open("ab") as log:
        log.write(attempt_header(attempts_logged(earlier) + 1,
                                 time.strftime("%Y-%m-%d %H:%M:%S %z"), command).encode())
        log.flush()
        output_start = log.tell()
        returncode = (runner or CellRunner()).run(
            argv, cwd=REPO_ROOT, env=dict(env or os.environ), stdout=log,
            stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    status, error = cell_outcome(returncode, (cell_dir / EVAL_FILE).exists(),
                                 _read_output(log_path, output_start))
    record = {"status": status, "error": error, "wall_s": wall, "returncode": returncode}
    _write_json(cell_dir / STATUS_FILE, record)
    return record


def _read_output(path: pathlib.Path, start: int) -> str:
    """This attempt's output in the log (from byte `start`), at most its last _OUTPUT_TAIL
    bytes: failures are diagnosed from the end."""
    with path.open("rb") as f:
        f.seek(max(start, path.stat().st_size - _OUTPUT_TAIL))
        return f.read().decode(errors="replace")


class StaleCellsError(ValueError):
    """Cell folders hold runs of another config than the sweep now gives them."""


def check_records(sweep: Mapping[str, Any], workdir: pathlib.Path
                  ) -> tuple[dict[str, list[str]], list[str]]:
    """(stale: cell name → what changed since its folder's run was started (record_changes),
    unrecorded: cells with a result or status but no record, from before records were kept)."""
    stale, unrecorded = {}, []
    for name, cell in zip(cell_names(sweep["cells"]), sweep["cells"]):
        cell_dir = workdir / name
        recorded = _read_json(cell_dir / CELL_FILE)
        if recorded is None:
            if (cell_dir / EVAL_FILE).exists() or (cell_dir / STATUS_FILE).exists():
                unrecorded.append(name)
            continue
        changes = record_changes(recorded, cell_record(sweep["base"], sweep["common"], cell))
        if changes:
            stale[name] = changes
    return stale, unrecorded


def run_sweep(sweep: Mapping[str, Any], workdir: pathlib.Path, *, rerun_failed: bool = False,
              env: Mapping[str, str] | None = None, out: TextIO | None = None) -> None:
    """Runs the unfinished cells one after another, printing progress and an ETA to `out`
    (sys.stdout as it is at call time when None). Raises StaleCellsError, before running
    anything, when a cell folder holds a run of another config (check_records)."""
    out = out or sys.stdout
    planned = plan(sweep, workdir)
    stale, unrecorded = check_records(sweep, workdir)
    if stale:
        raise StaleCellsError(stale_error(stale, workdir))
    if unrecorded:
        print(f"{len(unrecorded)} cell(s) hold results from before the sweep recorded each "
              f"cell's config, so they cannot be checked; assumed to match the sweep as it is "
              f"now: {', '.join(unrecorded)}", file=out, flush=True)
    todo = []
    for name, cell, command in planned:
        record = _read_json(workdir / name / STATUS_FILE) or {}
        finished = (workdir / name / EVAL_FILE).exists()
        failed = record.get("status") in ("crashed", "diverged")
        if not finished and (rerun_failed or not failed):
            todo.append((name, cell, command))
    print(f"sweep {sweep['name']}: {len(planned)} cells, {len(planned) - len(todo)} already "
          f"finished or failed (skipped), {len(todo)} to run", file=out, flush=True)
    start, durations = time.perf_counter(), []
    with CellRunner() as runner:
        for i, (name, cell, command) in enumerate(todo, 1):
            if runner.stop_requested:
                break
            print(f"[{i}/{len(todo)}] {name} ...", file=out, flush=True)
            (workdir / name).mkdir(parents=True, exist_ok=True)
            _write_json(workdir / name / CELL_FILE,
                        cell_record(sweep["base"], sweep["common"], cell))
            record = run_cell(command, workdir / name, env, runner)
            durations.append(record["wall_s"])
            elapsed = time.perf_counter() - start
            eta = _mean(durations) * (len(todo) - i)
            detail = f": {record['error']}" if record["error"] else ""
            print(f"[{i}/{len(todo)}] {name}: {record['status']} in {record['wall_s']:.0f}s"
                  f"{detail}  (elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)",
                  file=out, flush=True)
    if runner.stop_requested:
        print(f"SIGTERM: stopped after {len(durations)} of {len(todo)} cells (the running one "
              "saved a checkpoint); re-run the same command to continue", file=out, flush=True)


def baseline_key(config: ml_collections.ConfigDict) -> str:
    """What the pixel baseline depends on: the data config, the pairs seed, the distance."""
    plain = to_plain(config)
    identity = {"data": plain["data"], "seed": plain["seed"],
                "eval_distance": plain["eval"]["distance"]}
    return f"{plain['data']['source']}_{_digest(identity)}"


def pixel_baseline(config: ml_collections.ConfigDict, workdir: pathlib.Path
                   ) -> tuple[str, dict[str, Any] | None]:
    """The raw-pixel baseline of a config's test pairs, computed once per distinct (data,
    seed, eval distance) and cached as DIR/pixel_baselines/<key>.json."""
    key = baseline_key(config)
    path = workdir / BASELINE_DIR / f"{key}.json"
    cached = _read_json(path)
    if cached is not None:
        return key, cached
    from facenet_jax import evaluate  # local: pulls in the data pipeline and metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = evaluate.evaluate_pixels(config, path)
    except (OSError, ValueError) as error:
        print(f"pixel baseline {key} unavailable: {error}", file=sys.stderr)
        return key, None
    return key, {k: result[k] for k in ("accuracy", "accuracy_std", "auc")}


def aggregate(sweep: Mapping[str, Any], workdir: pathlib.Path) -> list[dict[str, Any]]:
    """Writes DIR/results.csv, DIR/results.md and the plots from whatever the cells hold."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, histories, baselines = [], {}, {}
    columns = table_columns(sweep["cells"])
    config_keys = [c for c in columns if c not in METRIC_COLUMNS]
    stale, _ = check_records(sweep, workdir)
    for name, cell in zip(cell_names(sweep["cells"]), sweep["cells"]):
        cell_dir = workdir / name
        config = cell_config(sweep["base"], sweep["common"], cell)
        key, baseline = pixel_baseline(config, workdir)
        baselines[key] = baseline
        if name in stale:  # another config's run: the current cell's row, none of its numbers
            plain, evaluation, metrics = to_plain(config), None, []
            status = {"status": "stale",
                      "error": f"its folder holds a run of another config: "
                               f"{'; '.join(stale[name])}"}
        else:
            saved = _read_json(cell_dir / "config.json")
            plain = saved["config"] if saved else to_plain(config)
            evaluation, metrics = _read_json(cell_dir / EVAL_FILE), read_metrics(cell_dir)
            status = _read_json(cell_dir / STATUS_FILE)
        histories[name] = [row for row in metrics if "loss" in row]
        row = result_row(config_keys, plain, evaluation, metrics, status,
                         baseline["accuracy"] if baseline else None)
        rows.append({"name": name, **row})
    write_csv(rows, ["name", *columns], workdir / RESULTS_CSV)
    write_markdown(sweep, rows, columns, baselines, workdir / RESULTS_MD)
    if any(row["status"] == "ok" for row in rows):
        plot_accuracy(rows, columns, workdir / ACCURACY_PLOT)
        plot_active_fraction(rows, columns, histories, workdir / ACTIVE_PLOT)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep file with get_sweep()")
    parser.add_argument("--workdir", required=True, help="folder of the cells and results")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print_commands", action="store_true",
                      help="print one train command per cell and run nothing")
    mode.add_argument("--aggregate_only", action="store_true",
                      help="only rebuild results.csv/results.md/plots from the cell folders")
    parser.add_argument("--rerun_failed", action="store_true",
                        help="also re-run cells recorded as crashed or diverged")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    workdir = pathlib.Path(args.workdir).resolve()
    if args.print_commands:
        for _, _, command in plan(sweep, workdir):
            print(shlex.join(command))
        return
    if not args.aggregate_only:
        try:
            run_sweep(sweep, workdir, rerun_failed=args.rerun_failed)
        except StaleCellsError as error:
            sys.exit(f"sweep {sweep['name']}: {error}")
    rows = aggregate(sweep, workdir)
    ok = sum(row["status"] == "ok" for row in rows)
    print(f"{ok}/{len(rows)} cells finished; wrote {workdir / RESULTS_MD}, "
          f"{workdir / RESULTS_CSV}")


if __name__ == "__main__":
    main()
