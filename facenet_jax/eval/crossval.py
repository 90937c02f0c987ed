"""The LFW protocol as one command: cross-validation over the folds of a pairs file.

    python -m facenet_jax.crossval --config experiments/lfw.py --pairs PAIRS --workdir D \
        [--folds 1,2,...] [--config.KEY=VALUE ...]

For each fold k (1-based, as LFW numbers them; default: every fold of PAIRS):

1. train a normal run in D/fold_k with data.split.exclude_pairs_file=PAIRS and
   data.split.exclude_pairs_fold=k: the people of fold k's pairs are moved out of training
   *and* validation (to the run's test split); the other folds' people are training data;
2. take the run's threshold, chosen on its validation split (people of the training side only)
   at the last step (evaluate.run_threshold, eval_validation.json);
3. score fold k's official pairs once, at that fixed threshold → D/fold_k/eval_crossval.json
   (+ ROC and distance-histogram figures).

Which threshold each number uses: `accuracy` (and tar, far) at the validation threshold of
step 2; `auc` and `roc_val@far=1e-3` (VAL@FAR=1e-3) from fold k's own ROC (threshold-free
descriptions of the curve; with 300 different pairs a fold cannot resolve FAR = 1e-3, so that
VAL is the TAR at which no different pair is accepted: `roc_val@far=1e-3_resolved` says so).
LFW's own protocol picks fold k's threshold on the other 9 folds' pairs; here the other folds'
people are in training, so their pairs would flatter the threshold: the validation split of
the training people is the honest place to choose it.

Re-running the command skips finished folds (their eval_crossval.json recorded with the same
config), resumes unfinished ones from their checkpoints (each D/fold_k is a normal run folder)
and rewrites the summary: D/crossval.json (per fold, and mean ± sample std over the folds,
ddof = 1: a spread across runs, see `reporting`; null for one fold), D/crossval.md (the table;
"n=1" for one fold) and D/crossval.png (per-fold bars).
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from facenet_jax import data, runfiles
from facenet_jax.cli import cli_logging
from facenet_jax.config import changed_keys, json_safe, set_dotted, to_plain
from facenet_jax.data.folder import scan_folder
from facenet_jax.data.pairs import parse_pairs_file
from facenet_jax.data.splits import EXCLUDE_FOLD_KEY
from facenet_jax.eval import evaluate, plots, reporting, threshold

FOLD_EVAL_FILE = "eval_crossval.json"  # in D/fold_k: fold k's pairs at the run's threshold
FOLD_TIME_FILE = "crossval_time.json"  # in D/fold_k: the wall time of the attempt that finished
SUMMARY_FILE = "crossval.json"
TABLE_FILE = "crossval.md"
FIGURE_FILE = "crossval.png"
LOCK_FILE = ".crossval.lock"
# (eval key, column name, which threshold it uses) of the per-fold and mean ± std table.
COLUMNS = (
    ("accuracy", "accuracy", "the run's validation-split threshold, fixed before scoring"),
    ("roc_val@far=1e-3", "VAL@FAR=1e-3", "read off the fold's own ROC (metrics.val_on_roc)"),
    ("auc", "AUC", "threshold-free, the fold's own ROC"),
)


def fold_dir(workdir: str | pathlib.Path, fold: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"fold_{fold}"


def count_folds(pairs_file: str | pathlib.Path) -> int:
    """The number of folds of a pairs file; ValueError when it has fewer than 2 (a header with
    one number is a single fold: nothing to cross-validate over)."""
    per_fold, parsed = parse_pairs_file(pairs_file)
    num_folds = len(parsed) // per_fold
    if num_folds < 2:
        raise ValueError(f"{pairs_file} holds {num_folds} fold (header "
                         f"{pathlib.Path(pairs_file).read_text().splitlines()[0]!r}); "
                         "cross-validation needs a pairs file with at least 2 folds (header "
                         "'N_folds N_per_fold', e.g. LFW's '10\\t300')")
    return num_folds


def parse_folds(text: str | None, num_folds: int) -> list[int]:
    """--folds "1,3" → [1, 3] (sorted, unique); None or "" → every fold 1..num_folds."""
    if not text:
        return list(range(1, num_folds + 1))
    try:
        folds = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--folds {text!r}: give comma-separated fold numbers, e.g. 1,2,3"
                         ) from None
    bad = [k for k in folds if not 1 <= k <= num_folds]
    if bad or not folds:
        raise ValueError(f"--folds {text!r}: the pairs file has folds 1..{num_folds}")
    return folds


def fold_config(config: ml_collections.ConfigDict, pairs_file: str | pathlib.Path,
                fold: int) -> ml_collections.ConfigDict:
    """The config of fold `fold`'s run: fold k's people out of training and validation."""
    config = copy.deepcopy(config)
    set_dotted(config, "data.split.exclude_pairs_file", str(pathlib.Path(pairs_file).resolve()))
    set_dotted(config, EXCLUDE_FOLD_KEY, fold)
    return config


def check_inputs(config: ml_collections.ConfigDict, pairs_file: str | pathlib.Path) -> int:
    """Everything checkable before training; returns the pairs file's fold count.

    The config must train on an image folder (data.source "folder") holding every image the
    pairs name, must have a validation split (the threshold is chosen there, never on the test
    split, which holds the scored people) and must not set the exclusion keys itself.
    """
    pairs_file = pathlib.Path(pairs_file)
    if not pairs_file.is_file():
        raise FileNotFoundError(f"--pairs {pairs_file} does not exist")
    num_folds = count_folds(pairs_file)
    split = config.data.split
    if split.exclude_pairs_file is not None and (
            pathlib.Path(split.exclude_pairs_file).resolve() != pairs_file.resolve()):
        raise ValueError(f"the config sets data.split.exclude_pairs_file="
                         f"{split.exclude_pairs_file}; crossval excludes each fold of --pairs "
                         f"{pairs_file} itself: leave the key unset")
    if split.exclude_pairs_fold is not None:
        raise ValueError(f"the config sets {EXCLUDE_FOLD_KEY}={split.exclude_pairs_fold}; "
                         "crossval sets it per fold: leave it unset (--folds selects folds)")
    if split.identity_files is None and not split.validation > 0:
        raise ValueError("crossval chooses each fold's threshold on the run's validation "
                         f"split, but data.split.validation={split.validation}: give it a "
                         "share of the identities (e.g. --config.data.split.validation=0.05)")
    if config.eval.subtract_mean:
        raise ValueError("crossval scores each fold at the validation split's threshold, a "
                         "fixed one, which subtracts no mean: leave eval.subtract_mean False "
                         "(eval.threshold_search, eval.distance and eval.flip_mode apply)")
    if config.data.source != "folder" or not config.data.root:
        raise ValueError(f"crossval scores the pairs on the training folder's images: it needs "
                         f"data.source='folder' and data.root (got source "
                         f"{config.data.source!r}, root {config.data.root!r}); pass "
                         "--config.data.source=folder --config.data.root=FOLDER")
    _check_pairs_in_folder(pairs_file, config.data.root)
    return num_folds


def _check_pairs_in_folder(pairs_file: pathlib.Path, root: str) -> None:
    """FileNotFoundError (from read_pairs, listing them) when images of the pairs are missing
    from root; only the folder listing is read, no image is decoded."""
    relative, names = scan_folder(root)
    index = {name: i for i, name in enumerate(names)}
    listing = data.Dataset(
        images=np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (len(relative), 1, 1, 3)),
        labels=np.array([index[p.split("/")[0]] for p in relative], np.int32),
        identity_names=names, paths=[str(pathlib.Path(root) / p) for p in relative])
    try:
        data.read_pairs(pairs_file, listing)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data.root {root} lacks images of the pairs: {error}") from None


def fold_is_done(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
    """Whether DIR's fold evaluation exists and was computed by a run of this very config; a
    fold folder of another layout is refused (runfiles.check_layout)."""
    runfiles.read_run_record(workdir)
    path = workdir / FOLD_EVAL_FILE
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return not changed_keys(saved["config"], to_plain(config), allowed=())


def run_fold(config: ml_collections.ConfigDict, pairs_file: pathlib.Path, fold: int,
             workdir: pathlib.Path) -> dict[str, Any]:
    """Trains (or resumes) fold `fold` in workdir, then scores its pairs once at the run's
    validation threshold; returns the fold's evaluation."""
    from facenet_jax.train import train_and_evaluate

    started = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    if result.get("preempted"):
        raise SystemExit(f"fold {fold}: stopped by SIGTERM at step {result['step']}; re-run the "
                         "same command to resume")
    train_seconds = time.perf_counter() - started
    chosen = threshold.run_threshold(workdir)
    if chosen["split"] != "validation":  # check_inputs asked for one: never the test split
        raise RuntimeError(f"{workdir}: the run's threshold comes from its {chosen['split']} "
                           "split, not a validation split; fold scores would be biased")
    started = time.perf_counter()
    scored = evaluate.evaluate_workdir(workdir, data_root=config.data.root,
                                       pairs_file=str(pairs_file),
                                       output=workdir / FOLD_EVAL_FILE, threshold="run",
                                       fold=fold)
    runfiles.atomic_write_json(workdir / FOLD_TIME_FILE, {
        "train_seconds": train_seconds, "score_seconds": time.perf_counter() - started,
        "note": "wall time of the attempt that finished the fold (data loading, compile and "
                "the run's final evaluations included; a resumed fold's earlier attempts are "
                "not counted)"})
    return scored


def fold_row(workdir: pathlib.Path, fold: int) -> dict[str, Any]:
    """One fold's summary row from D/fold_k's files."""
    result = json.loads((workdir / FOLD_EVAL_FILE).read_text())
    timing_path = workdir / FOLD_TIME_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    row = {"fold": fold, **{key: result.get(key) for key, _, _ in COLUMNS}}
    row.update({"roc_val@far=1e-3_resolved": result.get("roc_val@far=1e-3_resolved"),
                "threshold": result["threshold"], "threshold_source":
                result.get("threshold_source"), "tar": result.get("tar"),
                "far": result.get("far"), "num_pairs": result["num_pairs"],
                "step": result.get("step"), "train_seconds": timing.get("train_seconds"),
                "eval_file": str(workdir / FOLD_EVAL_FILE)})
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"mean": {key: mean over folds}, "std": {key: sample std over folds (ddof=1; None for
    one fold)}, "n": {key: folds with a value}} of the table's columns and the training time
    (a spread across runs: reporting.sample_std)."""
    keys = [key for key, _, _ in COLUMNS] + ["train_seconds"]
    stats: dict[str, dict[str, Any]] = {"mean": {}, "std": {}, "n": {}}
    for key in keys:
        values = [float(row[key]) for row in rows if row.get(key) is not None]
        if values:
            stats["mean"][key] = float(np.mean(values))
            stats["std"][key] = reporting.sample_std(values)
            stats["n"][key] = len(values)
    return stats


def format_table(rows: Sequence[dict[str, Any]], stats: dict[str, dict[str, float]]) -> str:
    """The markdown table: one row per fold, then mean ± sample std (n=1 for one fold)."""
    head = ["fold"] + [name for _, name, _ in COLUMNS] + ["threshold", "training (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        val = f"{row['roc_val@far=1e-3']:.4f}" + (
            reporting.UNRESOLVED_MARK if reporting.unresolved(row, "roc_val@far=1e-3") else "")
        seconds = row["train_seconds"]
        lines.append(f"| {row['fold']} | {row['accuracy']:.4f} | {val} | {row['auc']:.4f} | "
                     f"{row['threshold']:.4f} | "
                     f"{'n/a' if seconds is None else f'{seconds:.0f}'} |")
    def both(key: str, fmt: str) -> str:
        return reporting.format_spread(stats["mean"].get(key), stats["std"].get(key),
                                       stats["n"].get(key, 0), fmt)

    lines.append(f"| **mean ± sample std** | **{both('accuracy', '.4f')}** | "
                 f"{both('roc_val@far=1e-3', '.4f')} | {both('auc', '.4f')} | | "
                 f"{both('train_seconds', '.0f')} |")
    notes = [f"- {name}: {rule}." for _, name, rule in COLUMNS]
    if any(reporting.unresolved(row, "roc_val@far=1e-3") for row in rows):
        notes.append("- " + reporting.unresolved_note("1e-3") + " Here that threshold is "
                     "read off the fold's own pairs.")
    notes.append("- sample std: the standard deviation over the folds with ddof=1 (n=1: one "
                 "fold, no spread); training (s): wall time of the attempt that finished the "
                 "fold, data loading and compile included.")
    return "\n".join(lines + [""] + notes) + "\n"


def write_summary(workdir: pathlib.Path, pairs_file: pathlib.Path, folds: Sequence[int],
                  num_folds: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """D/crossval.json, D/crossval.md and D/crossval.png from the folds' files."""
    rows = [fold_row(fold_dir(workdir, k), k) for k in folds]
    stats = summarize(rows)
    summary = {
        "pairs": str(pairs_file.resolve()), "folds": list(folds), "num_folds": num_folds,
        "rows": rows, **stats,
        "thresholds": {key: rule for key, _, rule in COLUMNS},
        "protocol": "fold k: trained without the people of fold k's pairs (out of training "
                    "and validation), threshold chosen on the validation split of the "
                    "training people, fold k's pairs scored once at it",
        "config": to_plain(config),
    }
    runfiles.atomic_write_json(workdir / SUMMARY_FILE, json_safe(summary))
    runfiles.atomic_write_text(workdir / TABLE_FILE, format_table(rows, stats))
    plots.plot_fold_bars(folds, {name: [row[key] for row in rows] for key, name, _ in COLUMNS},
                         workdir / FIGURE_FILE,
                         title=f"{workdir.name}: {len(folds)} of {num_folds} folds of "
                               f"{pairs_file.name}")
    return summary


def run_crossval(config: ml_collections.ConfigDict, pairs_file: str | pathlib.Path,
                 workdir: str | pathlib.Path, folds: str | Sequence[int] | None = None
                 ) -> dict[str, Any]:
    """The whole protocol (module docstring); returns the summary written to D/crossval.json.
    folds: fold numbers (1-based), "1,3" or None (all). Inputs are checked first."""
    pairs_file, workdir = pathlib.Path(pairs_file), pathlib.Path(workdir)
    num_folds = check_inputs(config, pairs_file)
    folds = parse_folds(folds if folds is None or isinstance(folds, str)
                        else ",".join(map(str, folds)), num_folds)
    workdir.mkdir(parents=True, exist_ok=True)
    with runfiles.exclusive_lock(workdir / LOCK_FILE, what=f"cross-validating in {workdir}"):
        for position, fold in enumerate(folds, start=1):
            run_config, run_dir = fold_config(config, pairs_file, fold), fold_dir(workdir, fold)
            if fold_is_done(run_dir, run_config):
                logging.info("fold %d (%d of %d): done, skipped (%s)", fold, position,
                             len(folds), run_dir / FOLD_EVAL_FILE)
                continue
            logging.info("fold %d (%d of %d): training in %s", fold, position, len(folds),
                         run_dir)
            result = run_fold(run_config, pairs_file, fold, run_dir)
            logging.info("fold %d: accuracy %.4f at the validation threshold %.4f, AUC %.4f",
                         fold, result["accuracy"], result["threshold"], result["auc"])
        return write_summary(workdir, pairs_file, folds, num_folds, config)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    cli_logging()
    flags_ = flags.FLAGS
    summary = run_crossval(flags_.config, flags_.pairs, flags_.workdir, flags_.folds)
    workdir = pathlib.Path(flags_.workdir)
    print((workdir / TABLE_FILE).read_text())
    print(f"wrote {workdir / SUMMARY_FILE}, {workdir / TABLE_FILE}, {workdir / FIGURE_FILE} "
          f"({len(summary['rows'])} folds)")


def define_flags() -> None:
    """The flags of `python -m facenet_jax.crossval` (absl), defined once by that module."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("pairs", None, "LFW-format pairs file with at least 2 folds")
    flags.DEFINE_string("workdir", None, "cross-validation folder (fold_k/ run folders inside; "
                        "re-use to resume)")
    flags.DEFINE_string("folds", None, "comma-separated folds to run (1-based; default all)")
    flags.mark_flags_as_required(["config", "pairs", "workdir"])
