"""Result rows, aggregation over seeds, and the tables and plots of a sweep folder.

DIR/results.csv keeps one row per run (cell × seed); DIR/results.md shows one row per cell:
with several seeds, each metric is the mean over the cell's finished seeds, accuracy shown as
mean ± sample std over seeds ("(n=1)" for one seed: `reporting.format_spread`), and the
collapse flag as "k/n" seeds collapsed (those rows are also in DIR/results_over_seeds.csv).
With one seed per cell the table is the per-run one, its accuracy shown ± the std over the 10
folds. An unresolved VAL@FAR carries `reporting.UNRESOLVED_MARK`. Every file is written
atomically.
"""

from __future__ import annotations

import csv
import io
import pathlib
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections

from facenet_jax.eval import reporting
from facenet_jax.config import flatten, pairs_seed, to_plain
from facenet_jax.logs import read_metrics
from facenet_jax.runfiles import atomic_write_text, read_run_record
from facenet_jax.sweep import plots
from facenet_jax.collapse import (COLLAPSE_LOSS_RTOL, COLLAPSE_RADIUS,
                                        COLLAPSE_SPREAD_OF_MARGIN, COLLAPSE_WINDOW)
from facenet_jax.sweep.records import EVAL_FILE, STATUS_FILE, check_records, read_json
from facenet_jax.sweep.kinds import (config_columns, described_columns, every_row_reads,
                                     extra_metrics, notes, objective_values, present_kinds,
                                     row_collapsed, with_metrics)
from facenet_jax.sweep.spec import (REPO_ROOT, SEED_KEY, cell_config, cell_names, digest,
                                    format_value)
from facenet_jax.sweep.stages import INIT_KEY, is_reference

if TYPE_CHECKING:
    from facenet_jax.objectives import ObjectiveKind

BASELINE_DIR = "pixel_baselines"
RESULTS_CSV = "results.csv"
RESULTS_SEEDS_CSV = "results_over_seeds.csv"
RESULTS_MD = "results.md"
ACCURACY_PLOT = "accuracy_vs_margin.png"
ACTIVE_PLOT = "active_fraction.png"
ACCURACY_BY_CELL_PLOT = "accuracy_by_cell.png"  # sweeps with rows that have no α
METRIC_COLUMNS = ("accuracy", "accuracy_std", "val@far=1e-3", "val@far=1e-3_resolved", "auc",
                  "final_loss",
                  "final_active_fraction", "final_embedding_spread", "collapsed", "wall_s",
                  "status", "error", "pixel_accuracy")
# Per-cell columns over seeds: metrics averaged (and the objectives' own metrics, see
# sweep.kinds), with the std over seeds of the scores.
MEANED = ("accuracy", "val@far=1e-3", "auc", "final_loss", "final_active_fraction",
          "final_embedding_spread", "wall_s")
SEED_COLUMNS = ("n", "runs", "accuracy", "accuracy_std", "val@far=1e-3", "val@far=1e-3_std",
                "val@far=1e-3_resolved", "auc", "auc_std", "final_loss", "final_active_fraction",
                "final_embedding_spread", "collapsed", "wall_s", "status", "pixel_accuracy")


# ----------------------------------------------------------------------------------------------
# Rows (pure).


def result_row(keys: Sequence[str], config: Mapping[str, Any],
               evaluation: Mapping[str, Any] | None, metrics: Sequence[Mapping[str, Any]],
               status_record: Mapping[str, Any] | None, pixel_accuracy: float | None,
               evaluation_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One table row from a cell's plain config, eval.json, metrics and status.

    keys: the config columns (dotted), read from the cell's config, so a key that only some
    cells override still has its value in every row (sweep.kinds.objective_values: a
    classification head's resolved s and m; keys the row's objective does not read empty).
    evaluation_keys: further eval.json metrics to read (the objectives' own, e.g.
    "oneshot_top1"). status: "ok" (eval.json exists), else the recorded
    "crashed"/"diverged"/"preempted" (or "stale", see aggregate), else "pending".
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
        "val@far=1e-3_resolved": evaluation.get("val@far=1e-3_resolved"),
        "auc": evaluation.get("auc"),
        "final_loss": last.get("loss"),
        "final_active_fraction": last.get("active_fraction"),
        "final_embedding_spread": last.get("embedding_spread"),
        **{key: evaluation.get(key) for key in evaluation_keys},
        "collapsed": row_collapsed(train_rows, flat),
        "wall_s": status_record.get("wall_s"),
        "status": status,
        "error": error,
        "pixel_accuracy": pixel_accuracy,
    })
    row.update(objective_values(flat, keys))
    return row


def table_columns(cells: Sequence[Mapping[str, Any]], flats: Sequence[Mapping[str, Any]]
                  ) -> list[str]:
    """The config columns (`sweep.kinds.config_columns`: what the cells set or differ in, and
    their objectives' own), then the metrics (with the objectives' own). flats: each cell's
    flattened resolved config."""
    return config_columns(cells, flats) + with_metrics(
        METRIC_COLUMNS, extra_metrics(present_kinds(flats)))


def over_seeds(rows: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
               extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per cell, the runs that differ only in `seed` gathered (first-seen order).

    Each: the config keys but seed; "runs" (how many seeds the sweep gives the cell); "n" (how
    many finished, status "ok"); per MEANED metric (and `extra` one) its mean over the finished seeds (None if
    none has it); "accuracy_std", "val@far=1e-3_std", "auc_std": the sample std over those
    seeds (None below 2), "<metric>_n" how many seeds have it; "val@far=1e-3_resolved": False
    when some finished seed's is (None when none says); "collapsed": how many finished seeds
    collapsed (None when no finished seed could be judged); "status": "ok" when every run is,
    else the counts ("2 ok, 1 crashed"); "pixel_accuracy" (shared by the seeds when
    data.pairs.seed is pinned).
    """
    keys = [k for k in config_keys if k != SEED_KEY]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.get(k)) for k in keys), []).append(row)
    summary = []
    for runs in groups.values():
        done = [r for r in runs if r["status"] == "ok"]
        cell = {k: runs[0].get(k) for k in keys}
        cell.update(runs=len(runs), n=len(done))
        for metric in (*MEANED, *extra):
            cell[metric] = _mean([r[metric] for r in done if r.get(metric) is not None])
        for metric in ("accuracy", "val@far=1e-3", "auc"):
            values = [r[metric] for r in done if r.get(metric) is not None]
            cell[f"{metric}_std"], cell[f"{metric}_n"] = reporting.sample_std(values), len(values)
        flags = [r["val@far=1e-3_resolved"] for r in done
                 if r.get("val@far=1e-3_resolved") is not None]
        cell["val@far=1e-3_resolved"] = all(flags) if flags else None
        judged = [r["collapsed"] for r in done if r.get("collapsed") is not None]
        cell["collapsed"] = sum(judged) if judged else None
        statuses = _in_order(r["status"] for r in runs)
        cell["status"] = "ok" if statuses == ["ok"] else ", ".join(
            f"{sum(r['status'] == s for r in runs)} {s}" for s in statuses)
        cell["pixel_accuracy"] = _mean([r["pixel_accuracy"] for r in runs
                                        if r.get("pixel_accuracy") is not None])
        summary.append(cell)
    return summary


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _in_order(values: Any) -> list[Any]:
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------------------------
# Tables (text).


def _format_cell(column: str, row: Mapping[str, Any], short: Collection[str] = ()) -> str:
    mark = reporting.UNRESOLVED_MARK if reporting.unresolved(row, column) else ""
    return _format_value(column, row, short) + mark


def _format_value(column: str, row: Mapping[str, Any], short: Collection[str] = ()) -> str:
    value = row.get(column)
    if value is not None and f"{column}_n" in row:  # over seeds: a spread across runs
        return reporting.format_spread(value, row.get(f"{column}_std"), row[f"{column}_n"])
    if value is not None and row.get(f"{column}_std") is not None:  # over the 10 folds
        return f"{value:.4f} ± {row[f'{column}_std']:.4f}"
    if value is None:
        return "—" if column != "error" else ""
    if column == "wall_s":
        return f"{value:.0f}"
    if column == "collapsed":
        if "runs" in row:  # over seeds: how many of the finished seeds
            return f"**{value}/{row['n']}**" if value else f"0/{row['n']}"
        return "**yes**" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if column in short else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
              path: pathlib.Path) -> None:
    atomic_write_text(path, csv_text(rows, columns))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   short: Collection[str] | None = None) -> str:
    """Rows as a markdown table (accuracy shown as mean ± std; the std column and the
    resolution flag folded in); floats of the `short` columns to 4 significant digits (None:
    the columns the objective kinds declare, `sweep.kinds.described_columns`: α, s, m)."""
    if short is None:
        short = described_columns()
    shown = [c for c in columns if c not in ("accuracy_std", "val@far=1e-3_std", "auc_std",
                                             "val@far=1e-3_resolved")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_format_cell(c, row, short) for c in shown) + " |"
              for row in rows]
    return "\n".join(lines)


# Statuses the count line names only when some cell has them.
_RARE_STATUSES = {"preempted": "the next sweep run resumes them",
                  "stale": "their folders hold runs of another config; see error"}


def markdown_report(sweep: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                    columns: Sequence[str], baselines: Mapping[str, Any],
                    cells: Sequence[Mapping[str, Any]] | None = None,
                    kinds: Sequence[ObjectiveKind] = ()) -> str:
    """results.md: the counts, what the columns mean, the table and the pixel baselines.
    `cells` (over_seeds rows) when the sweep has several seeds per cell: the table then has
    one row per cell. `kinds`: the objectives the rows train (sweep.kinds: their notes, own
    metrics and columns)."""
    extra = extra_metrics(kinds)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "crashed", "diverged",
                                                                "pending", *_RARE_STATUSES)}
    rare = "".join(f", {counts[s]} {s} ({meaning})" for s, meaning in _RARE_STATUSES.items()
                   if counts[s])
    common = ", ".join(f"`{k}={format_value(v)}`" for k, v in sweep["common"].items()) or "none"
    base = sweep["base"]
    base_text = base.relative_to(REPO_ROOT) if base.is_relative_to(REPO_ROOT) else base
    what = (f"{len(rows)} runs ({len(cells)} cells × seeds)" if cells is not None
            else f"{len(rows)} cells")
    accuracy = (
        "n: finished seeds of the cell; accuracy: mean ± sample std (ddof=1) over those seeds "
        "of each seed's 10-fold verification accuracy on held-out identities, (n=1) for a "
        "single seed (val@far=1e-3, auc and final_* are means over the seeds too; per-seed "
        "rows in results.csv); collapsed: how many seeds collapsed. " if cells is not None else
        "accuracy: 10-fold verification accuracy ± std over folds on held-out identities; ")
    lines = [
        f"# Sweep `{sweep['name']}`", "",
        f"Base config `{base_text}`; common overrides: {common}.  ",
        f"{what}: {counts['ok']} finished, {counts['crashed']} crashed, "
        f"{counts['diverged']} diverged, {counts['pending']} not run{rare}.", "",
        accuracy +
        "val@far=1e-3: true-accept rate at false-accept rate 1e-3; auc: ROC AUC; final_*: the "
        "last training log row (a mean over `log_every` steps); embedding spread is the mean "
        "pairwise distance in the loss's distance. "
        f"collapsed: over the last {COLLAPSE_WINDOW} log rows, embedding spread below that of "
        f"unit vectors {COLLAPSE_RADIUS:g} apart (squared {COLLAPSE_RADIUS ** 2:g}, euclidean "
        f"{COLLAPSE_RADIUS:g}) or, with the hinge, below {COLLAPSE_SPREAD_OF_MARGIN:g}·α; or "
        f"loss within {COLLAPSE_LOSS_RTOL:g}·α of α (of ln 2 with the soft margin); a collapsed "
        "cell can still score above chance. pixel_accuracy: the raw-pixel baseline on the same "
        "test pairs. wall_s: the cell's wall time here, compile and evaluation included."
        + notes(kinds), "",
        markdown_table(rows, columns) if cells is None else markdown_table(
            cells, [c for c in columns if c not in METRIC_COLUMNS and c != SEED_KEY
                    and c not in extra]
            + with_metrics(SEED_COLUMNS, extra)),
        "",
    ]
    if any(reporting.unresolved(row, "val@far=1e-3") for row in rows):
        lines += [reporting.unresolved_note("1e-3"), ""]
    for key, baseline in baselines.items():
        if baseline is not None:
            lines.append(f"Pixel baseline `{key}`: accuracy {baseline['accuracy']:.4f} ± "
                         f"{baseline['accuracy_std']:.4f}, AUC {baseline['auc']:.4f}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The pixel baseline and the aggregation (effects).


def baseline_key(config: ml_collections.ConfigDict) -> str:
    """What the pixel baseline depends on: the data config, the pairs seed, the distance."""
    plain = to_plain(config)
    data = {**plain["data"], "pairs": {k: v for k, v in plain["data"]["pairs"].items()
                                       if k != "seed"}}  # its effective value is "seed" below
    data.pop("sampler", None)  # how training batches are drawn: not the test pairs
    identity = {"data": data, "seed": pairs_seed(plain),
                "eval_distance": plain["eval"]["distance"]}
    return f"{plain['data']['source']}_{digest(identity)}"


def pixel_baseline(config: ml_collections.ConfigDict, workdir: pathlib.Path
                   ) -> tuple[str, dict[str, Any] | None]:
    """The raw-pixel baseline of a config's test pairs, computed once per distinct (data,
    pairs seed, eval distance) and cached as DIR/pixel_baselines/<key>.json."""
    key = baseline_key(config)
    path = workdir / BASELINE_DIR / f"{key}.json"
    cached = read_json(path)
    if cached is not None:
        return key, cached
    from facenet_jax.eval import evaluate  # local: pulls in the data pipeline and metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = evaluate.evaluate_pixels(config, path)
    except (OSError, ValueError) as error:
        print(f"pixel baseline {key} unavailable: {error}", file=sys.stderr)
        return key, None
    return key, {k: result[k] for k in ("accuracy", "accuracy_std", "auc")}


def aggregate(sweep: Mapping[str, Any], workdir: pathlib.Path) -> list[dict[str, Any]]:
    """Writes DIR/results.csv, DIR/results.md (and results_over_seeds.csv with seeds) and the
    plots from whatever the cells hold; returns the per-run rows."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, histories, baselines = [], {}, {}
    flats = [flatten(to_plain(cell_config(sweep["base"], sweep["common"], cell)))
             for cell in sweep["cells"]]
    kinds = present_kinds(flats)
    extra = extra_metrics(kinds)
    columns = table_columns(sweep["cells"], flats)
    config_keys = [c for c in columns if c not in METRIC_COLUMNS and c not in extra]
    stale = check_records(sweep, workdir)
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
            saved = read_run_record(cell_dir)
            plain = saved["config"] if saved else to_plain(config)
            if is_reference(cell.get(INIT_KEY)):  # the reference, not this seed's folder
                plain["model"]["init_from"] = cell[INIT_KEY]
            evaluation, metrics = read_json(cell_dir / EVAL_FILE), read_metrics(cell_dir)
            status = read_json(cell_dir / STATUS_FILE)
        histories[name] = [row for row in metrics if "loss" in row]
        row = result_row(config_keys, plain, evaluation, metrics, status,
                         baseline["accuracy"] if baseline else None, extra)
        rows.append({"name": name, **row})
    cells = over_seeds(rows, config_keys, extra)
    seeded = len(cells) < len(rows)
    write_csv(rows, ["name", *columns], workdir / RESULTS_CSV)
    if seeded:
        write_csv(cells, [k for k in config_keys if k != SEED_KEY]
                  + with_metrics(SEED_COLUMNS, extra), workdir / RESULTS_SEEDS_CSV)
    atomic_write_text(workdir / RESULTS_MD, markdown_report(sweep, rows, columns, baselines,
                                                            cells if seeded else None, kinds))
    if not any(row["status"] == "ok" for row in rows):
        return rows
    if every_row_reads(kinds, plots.MARGIN_AXES):
        plots.plot_accuracy(cells, config_keys, workdir / ACCURACY_PLOT)
        plots.plot_active_fraction(rows, config_keys, histories, workdir / ACTIVE_PLOT)
    else:  # some rows have no α axis to plot on
        plots.plot_accuracy_by_cell(cells, config_keys, workdir / ACCURACY_BY_CELL_PLOT)
    return rows
