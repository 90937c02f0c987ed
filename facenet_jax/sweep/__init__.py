"""Sweeps: run a grid of config overrides (cells, each over seeds), then tabulate and plot them.

    python -m facenet_jax.sweep --sweep experiments/sweeps/FILE.py --workdir DIR
        [--list | --print_commands | --aggregate_only | --cell I] [--parallel N]
        [--rerun_failed] [--config.KEY=VALUE ...]

`--config.KEY=VALUE` overrides apply to every cell (e.g. a shorter `num_steps`): they join the
sweep file's `common` overrides (replacing a key it sets there) and with them each cell's
resolved config, so a cell run with other overrides is stale (see `records`).

The parts, one module each: `spec` (sweep files, runs, names, commands), `records` (what each
cell folder records, written atomically; stale checks), `runner` (train processes, their logs
and outcomes, slots for concurrent runs), `report` (rows, aggregation over seeds, tables),
`plots` (figures), `collapse` (the collapse rule), `stages` (a cell starting from another
cell's run: `from_cell`), `kinds` (classification rows' columns and collapse rule). This module
is the driver that ties them: `plan`, `run_sweep` and the CLI `main` (it looks up
`train_command` and `run_cell` here, so a test can replace them).

Modes: by default every unfinished run, one after another (`--parallel N`: up to N at once,
each on its own share of the host's GPUs or CPU cores), then the tables; `--list` prints each
run's index, name and overrides; `--cell I` runs run I only (checking only its record) and
writes no tables, for a cluster job array (experiments/slurm/sweep_array.sbatch), after which
`--aggregate_only` builds the tables; `--print_commands` prints one train command per run.

A run whose `eval.json` exists is finished and skipped; one recorded as crashed or diverged is
not re-run unless `--rerun_failed` is given (re-running resumes from its last checkpoint); a
preempted one is resumed by the next plain run. SIGTERM to the sweep reaches every running
cell (each saves a checkpoint and is recorded as preempted) and no further cell starts.
Results go to DIR/results.csv (a row per run), DIR/results.md (a row per cell, mean ± sample
std over seeds when there are several) and the PNG plots.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from facenet_jax.collapse import (COLLAPSE_LOSS_RTOL, COLLAPSE_RADIUS,  # noqa: F401
                                        COLLAPSE_SPREAD_OF_MARGIN, COLLAPSE_WINDOW,
                                        collapse_spread, is_collapsed)
from facenet_jax.sweep.records import (CELL_FILE, EVAL_FILE, FAILED_STATUSES, LOG_FILE,  # noqa: F401
                                       STATUS_FILE, StaleCellsError, cell_record,
                                       check_records, needs_run, record_changes, stale_error,
                                       write_json)
from facenet_jax.sweep.report import (ACCURACY_PLOT, ACTIVE_PLOT,  # noqa: F401
                                      BASELINE_DIR, METRIC_COLUMNS, RESULTS_CSV, RESULTS_MD,
                                      RESULTS_SEEDS_CSV, aggregate, baseline_key, over_seeds,
                                      pixel_baseline, result_row, table_columns)
from facenet_jax.sweep.runner import (ATTEMPT_MARK, CellRunner, Slot,  # noqa: F401
                                      attempt_header, attempts_logged, cell_outcome,
                                      device_slots, diagnose_failure, finish_cell, host_slots,
                                      run_cell, start_cell, visible_gpus)
from facenet_jax.sweep.spec import (REPO_ROOT, cell_config, cell_name,  # noqa: F401
                                    cell_names, format_value, grid, list_lines, load_sweep,
                                    parse_config_overrides, train_command,
                                    unpinned_pairs_warning, with_overrides)
from facenet_jax.sweep.stages import (SOURCE_RECORD_KEY, DependencyError,  # noqa: F401
                                      dependency_error, from_cell, resolved, run_sources,
                                      source_identity, source_record)

_POLL_S = 0.2  # how often concurrent runs are checked for their end


def plan(sweep: Mapping[str, Any], workdir: pathlib.Path
         ) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, overrides, command) per run; loads every run's config first, so an unknown
    key or a wrong type fails before anything runs."""
    workdir = workdir.resolve()
    planned = []
    names = cell_names(sweep["cells"])
    for name, cell, source in zip(names, sweep["cells"], run_sources(sweep["cells"])):
        try:
            cell_config(sweep["base"], sweep["common"], cell)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"sweep cell {name} ({cell}): {error}") from error
        # A cell reference in model.init_from becomes its source run's folder here only.
        overrides = resolved({**sweep["common"], **cell},
                             None if source is None else workdir / names[source])
        planned.append((name, cell, train_command(sweep["base"], workdir / name, overrides)))
    return planned


def run_sweep(sweep: Mapping[str, Any], workdir: pathlib.Path, *, rerun_failed: bool = False,
              env: Mapping[str, str] | None = None, out: TextIO | None = None,
              only: Sequence[int] | None = None, parallel: int = 1,
              slots: Sequence[Slot] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the unfinished runs (those of `only`, run indices, when given), printing progress
    and an ETA to `out` (sys.stdout as it is at call time when None); returns each started
    run's status record by name.

    parallel > 1: up to that many at once, each on one of `slots` (default: host_slots, this
    host's GPUs or cores split `parallel` ways). Raises StaleCellsError, before running
    anything, when a cell folder holds a run of another config (check_records), and
    DependencyError when a run of `only` starts from a run (stages.from_cell) that is neither
    complete nor in `only`. Without `only`, a run starts only once its source run is complete
    (it is skipped, with a line saying so, if that run ended otherwise).
    """
    out = out or sys.stdout
    planned = plan(sweep, workdir)
    workdir = workdir.resolve()
    names = [name for name, _, _ in planned]
    source_of = {name: None if source is None else names[source]
                 for name, source in zip(names, run_sources(sweep["cells"]))}
    if only is not None:
        planned = [planned[i] for i in only]
    stale = check_records(sweep, workdir, only)
    if stale:
        raise StaleCellsError(stale_error(stale, workdir))
    warning = unpinned_pairs_warning(sweep)
    if warning:
        print(f"warning: {warning}", file=out, flush=True)
    todo = [run for run in planned if needs_run(workdir / run[0], rerun_failed)]
    if only is not None:
        _check_sources_given(todo, source_of, names, workdir)
    print(f"sweep {sweep['name']}: {len(planned)} cells, {len(planned) - len(todo)} already "
          f"finished or failed (skipped), {len(todo)} to run", file=out, flush=True)
    if parallel > 1:
        slots = list(slots or host_slots(parallel, env or os.environ))
        print(f"{len(slots)} at once: {'; '.join(slot.label for slot in slots)}", file=out,
              flush=True)
    progress = _Progress(len(todo), len(slots) if parallel > 1 else 1, out)
    with CellRunner() as runner:
        if parallel > 1:
            _run_concurrently(sweep, workdir, todo, env, runner, slots, progress, source_of)
        else:
            for name, cell, command in todo:
                if runner.stop_requested:
                    break
                if _source_state(source_of[name], workdir, waiting=()) == "blocked":
                    progress.blocked(name, source_of[name])
                    continue
                progress.started(name)
                _record_start(sweep, workdir, name, cell, source_of[name])
                progress.finished(name, run_cell(command, workdir / name, env, runner))
    if runner.stop_requested:
        print(f"SIGTERM: stopped after {len(progress.records)} of {len(todo)} cells (the "
              "running ones saved a checkpoint); re-run the same command to continue",
              file=out, flush=True)
    return progress.records


def _record_start(sweep: Mapping[str, Any], workdir: pathlib.Path, name: str,
                  cell: Mapping[str, Any], source: str | None = None) -> None:
    """Writes the run's sweep_cell.json; a run that starts from another (`source`, a run
    name) also records that run's identity, for the stale check."""
    (workdir / name).mkdir(parents=True, exist_ok=True)
    record = cell_record(sweep["base"], sweep["common"], cell)
    if source is not None:
        record[SOURCE_RECORD_KEY] = source_record(source, workdir / source / EVAL_FILE)
    write_json(workdir / name / CELL_FILE, record)


def _source_state(source: str | None, workdir: pathlib.Path, waiting: Sequence[str]) -> str:
    """"ready" (no source, or its run is complete), "wait" (its run is among `waiting`: queued
    or running) or "blocked" (it ended, or was skipped, without completing)."""
    if source is None or source_identity(workdir / source / EVAL_FILE) is not None:
        return "ready"
    return "wait" if source in waiting else "blocked"


def _check_sources_given(todo: Sequence[tuple[str, dict[str, Any], list[str]]],
                         source_of: Mapping[str, str | None], names: Sequence[str],
                         workdir: pathlib.Path) -> None:
    """DependencyError for the first run of `todo` whose source run is neither complete nor
    run before it in `todo` (the --cell case: its source is another array task's)."""
    earlier: list[str] = []
    for name, _, _ in todo:
        source = source_of[name]
        if _source_state(source, workdir, earlier) == "blocked":
            raise DependencyError(dependency_error(names.index(name), name, names.index(source),
                                                   source, workdir / source / EVAL_FILE))
        earlier.append(name)


def _run_concurrently(sweep: Mapping[str, Any], workdir: pathlib.Path,
                      todo: Sequence[tuple[str, dict[str, Any], list[str]]],
                      env: Mapping[str, str] | None, runner: CellRunner,
                      slots: Sequence[Slot], progress: "_Progress",
                      source_of: Mapping[str, str | None]) -> None:
    """Keeps every free slot busy with the next run whose source run (if any) is complete,
    until all ran or a SIGTERM came; waits for the running ones (which the SIGTERM reached)
    either way. A run whose source is queued or running waits; one whose source ended
    without completing is skipped."""
    queue, free, running = list(todo), list(slots), []
    while running or (queue and not runner.stop_requested):
        while queue and free and not runner.stop_requested:
            waiting = [entry[0] for entry in queue + running]
            states = [_source_state(source_of[entry[0]], workdir, waiting) for entry in queue]
            if "ready" not in states and "blocked" not in states:
                break
            index = next(i for i, state in enumerate(states) if state != "wait")
            name, cell, command = queue.pop(index)
            if states[index] == "blocked":
                progress.blocked(name, source_of[name])
                continue
            slot = free.pop(0)
            progress.started(name, slot.label)
            _record_start(sweep, workdir, name, cell, source_of[name])
            running.append((name, slot, start_cell(command, workdir / name, env, runner, slot)))
        for entry in list(running):
            name, slot, started = entry
            returncode = runner.poll(started.process)
            if returncode is not None:
                running.remove(entry)
                free.append(slot)
                progress.finished(name, finish_cell(started, returncode))
        if running:
            time.sleep(_POLL_S)


class _Progress:
    """The "[i/n] NAME ..." lines, with elapsed time and an ETA from the mean run time."""

    def __init__(self, total: int, at_once: int, out: TextIO) -> None:
        self.total, self.at_once, self.out = total, at_once, out
        self.records: dict[str, dict[str, Any]] = {}
        self._index: dict[str, int] = {}
        self._start = time.perf_counter()

    def started(self, name: str, where: str | None = None) -> None:
        self._index[name] = len(self._index) + 1
        on = f" on {where}" if where else ""
        print(f"[{self._index[name]}/{self.total}] {name}{on} ...", file=self.out, flush=True)

    def blocked(self, name: str, source: str) -> None:
        """A run not started: its source run did not complete (so it is not counted)."""
        self.total -= 1
        print(f"[-] {name}: not started: the run it starts from, {source}, did not complete "
              "(see its sweep_status.json); re-run the sweep once it has", file=self.out,
              flush=True)

    def finished(self, name: str, record: dict[str, Any]) -> None:
        self.records[name] = record
        durations = [r["wall_s"] for r in self.records.values()]
        elapsed = time.perf_counter() - self._start
        eta = sum(durations) / len(durations) * (self.total - len(durations)) / self.at_once
        detail = f": {record['error']}" if record["error"] else ""
        print(f"[{self._index[name]}/{self.total}] {name}: {record['status']} in "
              f"{record['wall_s']:.0f}s{detail}  (elapsed {elapsed / 60:.1f} min, ETA "
              f"{eta / 60:.1f} min)", file=self.out, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m facenet_jax.sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--config.KEY=VALUE (any number): a config "
                                            "override for every cell, e.g. "
                                            "--config.num_steps=200")
    parser.add_argument("--sweep", required=True, help="sweep file with get_sweep()")
    parser.add_argument("--workdir", required=True, help="folder of the cells and results")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print_commands", action="store_true",
                      help="print one train command per run and run nothing")
    mode.add_argument("--aggregate_only", action="store_true",
                      help="only rebuild results.csv/results.md/plots from the cell folders")
    mode.add_argument("--list", action="store_true",
                      help="print each run's index (for --cell), name and overrides")
    mode.add_argument("--cell", type=int, metavar="I",
                      help="run only run I of --list (no tables: --aggregate_only afterwards)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="run up to N runs at once, each on its own share of the GPUs "
                             "(CUDA_VISIBLE_DEVICES) or CPU cores")
    parser.add_argument("--rerun_failed", action="store_true",
                        help="also re-run cells recorded as crashed or diverged")
    args, config_args = parser.parse_known_args(argv)
    sweep = load_sweep(args.sweep)
    if config_args:
        sweep = with_overrides(sweep, parse_config_overrides(sweep["base"], config_args))
    workdir = pathlib.Path(args.workdir).resolve()
    runs = len(sweep["cells"])
    if args.cell is not None and not 0 <= args.cell < runs:
        parser.error(f"--cell {args.cell}: the sweep has {runs} runs, 0 to {runs - 1} "
                     "(--list numbers them)")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: N must be at least 1")
    if args.cell is not None and args.parallel > 1:
        parser.error("--cell runs one run: drop --parallel (an array task is one run)")
    if args.list:
        print("\n".join(list_lines(sweep)))
        return
    if args.print_commands:
        for _, _, command in plan(sweep, workdir):
            print(shlex.join(command))
        return
    if not args.aggregate_only:
        records = run_sweep(sweep, workdir, rerun_failed=args.rerun_failed,
                            only=None if args.cell is None else [args.cell],
                            parallel=args.parallel)
        if args.cell is not None:
            failed = [r for r in records.values() if r["status"] in FAILED_STATUSES]
            print(f"run {args.cell} done; once every run is, tabulate with --aggregate_only")
            sys.exit(1 if failed else 0)
    rows = aggregate(sweep, workdir)
    ok = sum(row["status"] == "ok" for row in rows)
    print(f"{ok}/{len(rows)} cells finished; wrote {workdir / RESULTS_MD}, "
          f"{workdir / RESULTS_CSV}")
