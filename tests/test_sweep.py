"""Sweeps: grids, cell names, sweep files, printed commands, skipping, failure records, stale
cells, preemption and cell logs (with a fake train), the collapse rule, aggregation from faked
cells, and one real sweep end to end (two tiny training cells and a crashing one)."""

import csv
import io
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from facenet_jax import sweep
from facenet_jax.config import load_config, to_plain

from tiny import RUNLOCAL_OVERRIDES, cli_env

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.py"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=-]+$")


def _write_sweep(folder, body):
    path = folder / "my_sweep.py"
    path.write_text(textwrap.dedent(body))
    return path


# ----------------------------------------------------------------------------------------------
# Grids and names.


def test_grid_is_the_product_in_key_order():
    cells = sweep.grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert cells == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                     {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


def test_grid_seeds_vary_fastest_and_single_axis():
    assert sweep.grid({"a": [1, 2]}, seeds=[0, 1]) == [
        {"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 0}, {"a": 2, "seed": 1}]
    assert sweep.grid({"a": [3]}) == [{"a": 3}]


@pytest.mark.parametrize("axes", [{"a": []}, {"a": "semihard"}])
def test_grid_rejects_empty_or_string_axes(axes):
    with pytest.raises(ValueError, match="axis 'a'"):
        sweep.grid(axes)


def test_cell_name_readable_and_independent_of_key_order():
    a = {"loss.margin": 0.2, "loss.strategy": "semihard"}
    b = {"loss.strategy": "semihard", "loss.margin": 0.2}
    assert sweep.cell_name(a) == sweep.cell_name(b) == "margin-0.2__strategy-semihard"
    assert sweep.cell_name({}) == "base"
    assert sweep.cell_name({"optimizer.learning_rate": 1e-05}) == "learning_rate-1e-05"


def test_cell_name_uses_full_keys_when_leaves_coincide():
    name = sweep.cell_name({"seed": 1, "data.split.seed": 2})
    assert name == "data.split.seed-2__seed-1"


def test_cell_name_makes_unsafe_values_safe_and_keeps_them_apart():
    a = sweep.cell_name({"data.root": "/x/y z"})
    b = sweep.cell_name({"data.root": "/x/y_z"})
    assert SAFE_NAME.match(a) and SAFE_NAME.match(b) and a != b
    assert a.startswith("root-x_y_z_")
    long_name = sweep.cell_name({f"k{i}": "v" * 20 for i in range(10)})
    assert len(long_name) <= 120 + 9 and SAFE_NAME.match(long_name)


def test_cell_names_unique_even_when_leaves_collide_across_cells():
    cells = [{"a.x": 1}, {"b.x": 1}, {"a.x": 2}]
    names = sweep.cell_names(cells)
    assert len(set(names)) == 3
    assert names[2] == "x-2"
    assert names[0].startswith("x-1_") and names[1].startswith("x-1_")
    assert sweep.cell_names(cells) == names  # stable


def test_every_cell_of_the_shipped_sweeps_has_a_unique_safe_name():
    for path in sorted((REPO / "experiments" / "sweeps").glob("*.py")):
        names = sweep.cell_names(sweep.load_sweep(path)["cells"])
        assert len(set(names)) == len(names), path
        assert all(SAFE_NAME.match(n) and not re.search(r"_[0-9a-f]{8}$", n) for n in names), path


# ----------------------------------------------------------------------------------------------
# Sweep files.


def test_load_sweep_resolves_base_relative_to_file_then_repo(tmp_path):
    relative_to_repo = _write_sweep(tmp_path, """
        def get_sweep():
            return {"base": "experiments/default.py", "cells": [{"loss.margin": 0.1}]}
    """)
    spec = sweep.load_sweep(relative_to_repo)
    assert spec["base"] == DEFAULT and spec["name"] == "my_sweep" and spec["common"] == {}
    (tmp_path / "cfg.py").write_text(DEFAULT.read_text())
    relative_to_file = _write_sweep(tmp_path, """
        def get_sweep():
            return {"base": "cfg.py", "cells": [{"loss.margin": 0.1}], "name": "n"}
    """)
    spec = sweep.load_sweep(relative_to_file)
    assert spec["base"] == (tmp_path / "cfg.py").resolve() and spec["name"] == "n"


@pytest.mark.parametrize("body, message", [
    ('{"base": "experiments/default.py"}', "missing: \\['cells'\\]"),
    ('{"base": "experiments/default.py", "cells": [{}], "grid": 1}', "unknown: \\['grid'\\]"),
    ('{"base": "experiments/default.py", "cells": []}', "no cells"),
    ('{"base": "nope.py", "cells": [{}]}', "'nope.py' not found"),
    ('{"base": "experiments/default.py", "cells": [{"seed": 1}, {"seed": 1}]}',
     "repeat the same overrides"),
])
def test_load_sweep_rejects_bad_files(tmp_path, body, message):
    path = _write_sweep(tmp_path, f"def get_sweep():\n    return {body}\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sweep.load_sweep(path)


def test_plan_rejects_an_unknown_key_before_running(tmp_path):
    path = _write_sweep(tmp_path, """
        def get_sweep():
            return {"base": "experiments/default.py", "cells": [{"loss.margn": 0.1}]}
    """)
    with pytest.raises(ValueError, match="loss.margn"):
        sweep.plan(sweep.load_sweep(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# --print_commands.


def _parse_train_command(line):
    """Parses a printed line the way the train CLI does (absl + ml_collections flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "facenet_jax.train"]
    cli = ["train", *argv[3:]]
    values = flags.FlagValues()
    # sys_argv: the config flag scans the command line for the override flags it must define.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=cli)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(cli)
    return values.config, values.workdir


def test_print_commands_are_exactly_runnable(tmp_path, capsys):
    path = _write_sweep(tmp_path, """
        from facenet_jax.sweep import grid
        def get_sweep():
            return {"base": "experiments/default.py",
                    "common": {"num_steps": 30, "optimizer.decay_boundaries": (0.3, 0.6)},
                    "cells": grid({"loss.strategy": ["semihard", "all"],
                                   "loss.margin": [0.05, 1], "loss.soft": [True, False],
                                   "data.root": ["/a b/c'd"]})}
    """)
    spec = sweep.load_sweep(path)
    sweep.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs"),
                "--print_commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    names = sweep.cell_names(spec["cells"])
    for line, cell, name in zip(lines, spec["cells"], names):
        parsed, workdir = _parse_train_command(line)
        expected = load_config(DEFAULT, {**spec["common"], **cell})
        assert to_plain(parsed) == to_plain(expected)
        assert workdir == str((tmp_path / "runs" / name).resolve())
    assert not (tmp_path / "runs").exists()  # nothing ran


# ----------------------------------------------------------------------------------------------
# Running: skipping, failure records, progress.


def _tiny_sweep_file(folder, cells):
    return _write_sweep(folder, f"""
        def get_sweep():
            return {{"base": "experiments/default.py", "cells": {cells!r}}}
    """)


def test_run_sweep_skips_finished_and_failed_cells(tmp_path, monkeypatch):
    spec = sweep.load_sweep(_tiny_sweep_file(
        tmp_path, [{"loss.margin": m} for m in (0.1, 0.2, 0.3, 0.4)]))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(spec["cells"])
    for name, cell in zip(names[:3], spec["cells"]):  # as run_sweep records a started cell
        (workdir / name).mkdir(parents=True)
        (workdir / name / sweep.CELL_FILE).write_text(json.dumps(
            sweep.cell_record(spec["base"], spec["common"], cell)))
    (workdir / names[0] / "eval.json").write_text("{}")
    (workdir / names[1] / sweep.STATUS_FILE).write_text(json.dumps({"status": "crashed"}))
    # names[2]: started, never finished (e.g. the sweep was killed)
    ran = []

    def fake_run_cell(command, cell_dir, env, runner=None):
        ran.append(cell_dir.name)
        return {"status": "ok", "error": None, "wall_s": 1.0, "returncode": 0}

    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    out = io.StringIO()
    sweep.run_sweep(spec, workdir, out=out)
    assert ran == names[2:]
    text = out.getvalue()
    assert "4 cells, 2 already finished or failed (skipped), 2 to run" in text
    assert f"[1/2] {names[2]}: ok in 1s" in text and "ETA" in text
    ran.clear()
    sweep.run_sweep(spec, workdir, rerun_failed=True, out=io.StringIO())
    assert ran == names[1:]


@pytest.mark.parametrize("returncode, stderr, status, error", [
    (1, "Traceback...\nfacenet_jax.train.NonFiniteLossError: non-finite loss (nan) at step 7\n",
     "diverged", "facenet_jax.train.NonFiniteLossError: non-finite loss (nan) at step 7"),
    (1, "Traceback...\nValueError: data.root missing\n\n", "crashed",
     "ValueError: data.root missing"),
    (-9, "", "crashed", "killed by signal 9; exit status -9 with no error output"),
])
def test_diagnose_failure(returncode, stderr, status, error):
    assert sweep.diagnose_failure(returncode, stderr) == (status, error)


# ----------------------------------------------------------------------------------------------
# Records of what each cell ran with (stale cells), preemption, the cell log (fake trains).

# A stand-in for the train CLI, run as `python FAKE_TRAIN CELL_DIR`: it logs to stderr and
# behaves as the file CELL_DIR/../plan.json says for the cell ("ok", "preempt", "fail").
FAKE_TRAIN = """
import json, pathlib, sys
cell = pathlib.Path(sys.argv[1])
plan = json.loads((cell.parent / "plan.json").read_text())
runs = plan.setdefault("runs", {})
runs[cell.name] = runs.get(cell.name, 0) + 1
(cell.parent / "plan.json").write_text(json.dumps(plan))
print(f"fake train of {cell.name}, run {runs[cell.name]}", file=sys.stderr, flush=True)
todo = plan["actions"][cell.name]
action = todo[min(runs[cell.name], len(todo)) - 1]
if action == "preempt":
    print("W train.py] SIGTERM: saved step 2; re-run the same command to resume",
          file=sys.stderr)
elif action == "fail":
    sys.exit("ValueError: fake failure")
elif action == "await_sigterm":  # like the train CLI: SIGTERM saves, then exits 0
    import os, signal
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    (cell / "child.pid").write_text(str(os.getpid()))
    if signal.sigtimedwait([signal.SIGTERM], 120) is None:
        sys.exit("ValueError: no SIGTERM reached the cell")
    print("W train.py] SIGTERM: saved step 2; re-run the same command to resume",
          file=sys.stderr, flush=True)
    sys.exit(0)
else:
    (cell / "eval.json").write_text(json.dumps({"accuracy": 0.9, "accuracy_std": 0.01,
                                                "val@far=1e-3": 0.5, "auc": 0.95}))
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Makes the sweep run FAKE_TRAIN instead of the train CLI; returns set_actions(workdir,
    {cell name: [action per run]}), which returns a function giving each cell's run count."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(sweep, "train_command",
                        lambda base, workdir, overrides, python="python":
                        [python, str(script), str(workdir)])

    def set_actions(workdir, actions):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "plan.json").write_text(json.dumps({"actions": actions}))
        return lambda: json.loads((workdir / "plan.json").read_text()).get("runs", {})
    return set_actions


def _cached_baseline(spec, workdir):
    """Writes the pixel baseline aggregate would compute, so aggregating stays fast."""
    config = sweep.cell_config(spec["base"], spec["common"], spec["cells"][0])
    (workdir / sweep.BASELINE_DIR).mkdir(parents=True, exist_ok=True)
    (workdir / sweep.BASELINE_DIR / f"{sweep.baseline_key(config)}.json").write_text(
        json.dumps({"accuracy": 0.6, "accuracy_std": 0.0, "auc": 0.6}))


def _sweep_with(folder, base, common, cells):
    return sweep.load_sweep(_write_sweep(folder, f"""
        def get_sweep():
            return {{"base": {str(base)!r}, "common": {common!r}, "cells": {cells!r}}}
    """))


def _two_cells_faked(folder, base, fake_train):
    """A sweep file in `folder` of two margin cells over `base` with num_steps=4 in common, to
    run by the fake train (each once, "ok") in folder/runs, its baseline cached: returns
    (cells, spec, workdir, names, runs)."""
    cells = [{"loss.margin": 0.1}, {"loss.margin": 0.3}]
    spec = _sweep_with(folder, base, {"num_steps": 4}, cells)
    workdir = folder / "runs"
    names = sweep.cell_names(cells)
    runs = fake_train(workdir, {name: ["ok"] for name in names})
    _cached_baseline(spec, workdir)
    return cells, spec, workdir, names, runs


@pytest.mark.parametrize("change", ["common", "base file"])
def test_a_changed_sweep_stops_before_running_and_marks_cells_stale(tmp_path, fake_train,
                                                                    change):
    """The repro of the bug: run with num_steps=4 in common, then 8 (or edit the base file):
    the sweep stops naming the cells and keys, touches nothing, and the tables show the cells
    as stale, not as results of the changed sweep. Restoring the sweep makes them count."""
    base = tmp_path / "base.py"
    base.write_text(DEFAULT.read_text())
    cells, spec, workdir, names, runs = _two_cells_faked(tmp_path, base, fake_train)
    sweep.run_sweep(spec, workdir, out=io.StringIO())
    assert runs() == {name: 1 for name in names}
    recorded = json.loads((workdir / names[0] / sweep.CELL_FILE).read_text())
    assert recorded["overrides"] == {"num_steps": 4, "loss.margin": 0.1}
    assert recorded["base"] == str(base.resolve()) and recorded["config"]["num_steps"] == 4

    if change == "common":
        changed = _sweep_with(tmp_path, base, {"num_steps": 8}, cells)
        what = "num_steps was 4, now 8"
    else:
        base.write_text(DEFAULT.read_text().replace("opt.decay_boundaries = (0.5, 0.75)",
                                                    "opt.decay_boundaries = (0.5, 0.8)"))
        changed = spec
        what = "optimizer.decay_boundaries was [0.5, 0.75], now [0.5, 0.8]"
    evals = {name: (workdir / name / "eval.json").read_bytes() for name in names}
    with pytest.raises(sweep.StaleCellsError) as error:
        sweep.run_sweep(changed, workdir, out=io.StringIO())
    message = str(error.value)
    assert f"{names[0]}, {names[1]}: {what}" in message
    assert "new --workdir" in message and "move those cell folders" in message
    assert runs() == {name: 1 for name in names}  # nothing ran
    assert {name: (workdir / name / "eval.json").read_bytes() for name in names} == evals

    with pytest.raises(sweep.StaleCellsError, match="Nothing was run"):
        sweep.main(["--sweep", str(tmp_path / "my_sweep.py"), "--workdir", str(workdir)])
    rows = sweep.aggregate(changed, workdir)
    assert [row["status"] for row in rows] == ["stale", "stale"]
    assert all(row["accuracy"] is None and what in row["error"] for row in rows)
    assert "2 stale" in (workdir / "results.md").read_text()

    base.write_text(DEFAULT.read_text())
    restored = _sweep_with(tmp_path, base, {"num_steps": 4}, cells)
    out = io.StringIO()
    sweep.run_sweep(restored, workdir, out=out)
    assert "2 already finished or failed (skipped), 0 to run" in out.getvalue()
    assert [row["status"] for row in sweep.aggregate(restored, workdir)] == ["ok", "ok"]


def test_a_cell_folder_with_results_but_no_record_is_stale(tmp_path, fake_train):
    """Nothing says which config produced its numbers: the sweep stops naming it, running
    nothing, and the tables show it as a stale row."""
    spec = sweep.load_sweep(_tiny_sweep_file(tmp_path, [{"loss.margin": 0.1},
                                                        {"loss.margin": 0.2}]))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(spec["cells"])
    runs = fake_train(workdir, {name: ["ok"] for name in names})
    _cached_baseline(spec, workdir)
    (workdir / names[0]).mkdir()
    (workdir / names[0] / "eval.json").write_text(json.dumps({"accuracy": 0.8}))
    with pytest.raises(sweep.StaleCellsError,
                       match=rf"{names[0]}: it holds results but no sweep_cell.json"):
        sweep.run_sweep(spec, workdir, out=io.StringIO())
    assert runs() == {}
    rows = sweep.aggregate(spec, workdir)
    assert rows[0]["status"] == "stale" and rows[0]["accuracy"] is None
    assert rows[1]["status"] != "stale"  # not run yet, nothing to check


def test_command_line_overrides_reach_every_cell_and_a_changed_one_makes_them_stale(
        tmp_path, fake_train, capsys):
    """`--config.KEY=VALUE` on the sweep CLI: in every cell's record and train command (parsed
    as the train CLI parses it), replacing the file's common value; changing or dropping it
    later stops the sweep naming the stale cells, running nothing."""
    _, _, workdir, names, runs = _two_cells_faked(tmp_path, DEFAULT, fake_train)
    argv = ["--sweep", str(tmp_path / "my_sweep.py"), "--workdir", str(workdir)]
    short = ["--config.num_steps=6", "--config.optimizer.decay_boundaries=(0.3,0.6)"]
    sweep.main([*argv, *short])
    assert runs() == {name: 1 for name in names}
    recorded = json.loads((workdir / names[1] / sweep.CELL_FILE).read_text())
    assert recorded["overrides"] == {"num_steps": 6, "optimizer.decay_boundaries": [0.3, 0.6],
                                     "loss.margin": 0.3}
    assert recorded["config"] == to_plain(load_config(DEFAULT, {
        "num_steps": 6, "optimizer.decay_boundaries": (0.3, 0.6), "loss.margin": 0.3}))
    capsys.readouterr()
    sweep.main([*argv, *short])  # the same overrides: both cells are done
    assert "2 already finished or failed (skipped), 0 to run" in capsys.readouterr().out
    with pytest.raises(sweep.StaleCellsError,
                       match=f"{names[0]}, {names[1]}: num_steps was 6, now 7"):
        sweep.main([*argv, "--config.num_steps=7", short[1]])
    with pytest.raises(sweep.StaleCellsError, match="num_steps was 6, now 4; optimizer"):
        sweep.main(argv)  # dropped: the file's common num_steps=4 again
    assert runs() == {name: 1 for name in names}  # nothing ran


def test_command_line_overrides_are_on_every_printed_train_command(tmp_path, capsys):
    cells = [{"loss.margin": 0.1}, {"loss.margin": 0.3}]
    _sweep_with(tmp_path, DEFAULT, {"num_steps": 4}, cells)
    sweep.main(["--sweep", str(tmp_path / "my_sweep.py"), "--workdir", str(tmp_path / "runs"),
                "--print_commands", "--config.num_steps=6",
                "--config.optimizer.decay_boundaries=(0.3,0.6)"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, cell in zip(lines, cells):
        parsed, _ = _parse_train_command(line)
        assert to_plain(parsed) == to_plain(load_config(DEFAULT, {
            "num_steps": 6, "optimizer.decay_boundaries": (0.3, 0.6), **cell}))


@pytest.mark.parametrize("override, message", [
    ("--config.loss.margin=0.5", "--config.loss.margin: the sweep's cells set loss.margin "
                                 "themselves"),
    ("--config.num_stpes=6", '--config.num_stpes: unknown config key \'num_stpes\'; Did you '
                             'mean "num_steps"'),
    ("--config.num_steps=six", "flag --config.num_steps=six: invalid literal for int()"),
    ("--num_steps=6", "unrecognized arguments: --num_steps=6"),
])
def test_bad_command_line_overrides_are_refused_before_anything_runs(tmp_path, override,
                                                                     message):
    path = _tiny_sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.margin": 0.3}])
    with pytest.raises(ValueError) as error:
        sweep.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs"), override])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_record_changes_compare_resolved_configs(tmp_path):
    moved = tmp_path / "moved.py"
    moved.write_text(DEFAULT.read_text())
    cell = {"loss.margin": 0.1}
    recorded = sweep.cell_record(DEFAULT, {}, cell)
    # A moved base, and overrides restating its values (a tuple, as JSON's list), are the same.
    same = sweep.cell_record(moved, {"num_steps": 1200,
                                     "optimizer.decay_boundaries": (0.5, 0.75)}, cell)
    assert sweep.record_changes(recorded, same) == []
    other = sweep.cell_record(DEFAULT, {"num_steps": 8, "loss.soft": True}, cell)
    assert sweep.record_changes(recorded, other) == ["loss.soft was False, now True",
                                                     "num_steps was 1200, now 8"]
    assert sweep.record_changes(None, other) == []


def test_a_preempted_cell_is_recorded_so_and_resumed_by_the_next_plain_run(tmp_path,
                                                                           fake_train):
    """The train CLI exits 0 without eval.json after saving a checkpoint on SIGTERM: not a
    crash, and not skipped by the next run (which resumes it)."""
    spec = sweep.load_sweep(_tiny_sweep_file(tmp_path, [{"loss.margin": 0.1}]))
    workdir = tmp_path / "runs"
    name = sweep.cell_names(spec["cells"])[0]
    runs = fake_train(workdir, {name: ["preempt", "ok"]})
    _cached_baseline(spec, workdir)
    out = io.StringIO()
    sweep.run_sweep(spec, workdir, out=out)
    record = json.loads((workdir / name / sweep.STATUS_FILE).read_text())
    assert record["status"] == "preempted" and "SIGTERM: saved step 2" in record["error"]
    assert f"{name}: preempted in" in out.getvalue()
    assert sweep.aggregate(spec, workdir)[0]["status"] == "preempted"
    assert "1 preempted" in (workdir / "results.md").read_text()
    out = io.StringIO()
    sweep.run_sweep(spec, workdir, out=out)
    assert "0 already finished or failed (skipped), 1 to run" in out.getvalue()
    assert runs() == {name: 2}
    assert sweep.aggregate(spec, workdir)[0]["status"] == "ok"


# Runs a sweep with the fake train in its own process (SIGTERM must not reach pytest).
SWEEP_DRIVER = """
import pathlib, sys
from facenet_jax import sweep
script, sweep_file, workdir = sys.argv[1:]
sweep.train_command = lambda base, cell_dir, overrides, python="python": [
    python, script, str(cell_dir)]
sweep.run_sweep(sweep.load_sweep(sweep_file), pathlib.Path(workdir))
print("run_sweep returned", flush=True)
"""


def test_sigterm_to_the_sweep_preempts_the_running_cell_and_starts_no_other(tmp_path,
                                                                            fake_train):
    """A preempted sweep: the running cell gets the SIGTERM (saves, recorded as preempted, no
    orphan left running), the next cell is not started, and the sweep exits cleanly."""
    sweep_file = _tiny_sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.margin": 0.3}])
    spec = sweep.load_sweep(sweep_file)
    first, second = sweep.cell_names(spec["cells"])
    workdir = tmp_path / "runs"
    fake_train(workdir, {first: ["await_sigterm"], second: ["ok"]})
    driver = subprocess.Popen(
        [sys.executable, "-c", SWEEP_DRIVER, str(tmp_path / "fake_train.py"), str(sweep_file),
         str(workdir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid_file = workdir / first / "child.pid"
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 0, output
    assert "SIGTERM: stopped after 1 of 2 cells" in output and "run_sweep returned" in output
    record = json.loads((workdir / first / sweep.STATUS_FILE).read_text())
    assert record["status"] == "preempted" and "SIGTERM: saved step 2" in record["error"]
    assert not (workdir / second).exists()  # never started
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the cell ended with the sweep: no orphan


# Prints a line, then looks for it in its own cell's train.log: there only if streamed.
STREAM_CHECK = """
import pathlib, sys
cell = pathlib.Path(sys.argv[1])
print("line written before exiting", file=sys.stderr, flush=True)
seen = "line written before exiting" in (cell / "train.log").read_text()
if seen:
    (cell / "eval.json").write_text("{}")
sys.exit(0 if seen else 3)
"""


def test_cell_log_streams_while_running_and_keeps_every_attempt(tmp_path):
    cell = tmp_path / "cell"

    def attempt(code):
        return sweep.run_cell(["python", "-c", code, str(cell)], cell, None)

    first = attempt("import sys; print('NonFiniteLossError: nan at step 3', file=sys.stderr); "
                    "sys.exit(1)")
    assert first["status"] == "diverged"
    second = attempt("import sys; sys.exit('ValueError: data.root missing')")
    # Only this attempt's output is diagnosed, though the log still holds the first's.
    assert (second["status"], second["error"]) == ("crashed", "ValueError: data.root missing")
    third = attempt(STREAM_CHECK)
    assert third["status"] == "ok", third  # the cell saw its own line in the log as it ran
    log = (cell / sweep.LOG_FILE).read_text()
    headers = [line for line in log.splitlines() if line.startswith(sweep.ATTEMPT_MARK)]
    assert [h.split(",")[0] for h in headers] == [f"{sweep.ATTEMPT_MARK} {i}" for i in (1, 2, 3)]
    assert re.search(r", started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", headers[2])
    assert (log.index("NonFiniteLossError") < log.index(headers[1])
            < log.index("data.root missing") < log.index(headers[2])
            < log.index("line written before exiting"))


# ----------------------------------------------------------------------------------------------
# The collapse rule.


def _rows(losses, spreads):
    return [{"step": 10 * (i + 1), "loss": loss, "embedding_spread": spread}
            for i, (loss, spread) in enumerate(zip(losses, spreads))]


@pytest.mark.parametrize("losses, spreads, margin, distance, soft, expected", [
    ([0.2, 0.2, 0.2], [1.0] * 3, 0.2, "squared", False, True),          # loss pinned at α
    ([0.2019, 0.1981, 0.2], [1.0] * 3, 0.2, "squared", False, True),    # within 1e-2·α
    ([0.203, 0.2, 0.2], [1.0] * 3, 0.2, "squared", False, False),       # one row 1.5e-2·α off
    ([0.05, 0.04, 0.03], [1e-4, 5e-3, 9e-3], 0.05, "squared", False, True),  # spread < 0.1²
    ([0.05, 0.04, 0.03], [1e-4, 0.011, 9e-3], 0.05, "squared", False, False),  # one row above
    ([0.05, 0.04, 0.03], [0.09] * 3, 0.05, "euclidean", False, True),   # euclidean: < 0.1
    ([0.05, 0.04, 0.03], [0.11] * 3, 0.05, "euclidean", False, False),  # 0.11 > 0.1
    ([0.05, 0.04, 0.03], [0.004] * 3, 0.05, "cosine", False, True),     # cosine: < 0.1²/2
    ([0.05, 0.04, 0.03], [0.006] * 3, 0.05, "cosine", False, False),
    ([0.5, 0.4, 0.3], [0.09] * 3, 1.0, "squared", False, True),         # spread < α/10 = 0.1
    ([0.5, 0.4, 0.3], [0.09] * 3, 0.5, "squared", False, False),        # spread > α/10 = 0.05
    ([0.0] * 3, [2e-3] * 3, 0.0, "squared", False, True),               # α = 0: radius floor
    ([0.0] * 3, [0.02] * 3, 0.0, "squared", False, False),              # α = 0: no pinned loss
    ([0.2, 0.2, 0.2, 0.1], [1.0] * 4, 0.2, "squared", False, False),    # recovered at the end
    ([0.1, 0.2, 0.2, 0.2], [1.0] * 4, 0.2, "squared", False, True),     # only the last 3 count
    ([math.log(2)] * 3, [1.0] * 3, 0.2, "squared", True, True),         # soft: ln 2
    ([0.2] * 3, [1.0] * 3, 0.2, "squared", True, False),                # soft ignores α ...
    ([0.3] * 3, [0.05] * 3, 1.0, "squared", True, False),               # ... also for spread
    ([0.3] * 3, [0.009] * 3, 1.0, "squared", True, True),               # soft: radius floor
    ([0.5], [1.0], 0.5, "squared", False, True),                        # fewer rows than window
])
def test_collapse_rule(losses, spreads, margin, distance, soft, expected):
    rows = _rows(losses, spreads)
    assert sweep.is_collapsed(rows, margin=margin, distance=distance, soft=soft) is expected


@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_collapse_rule_flags_the_measured_batch_hard_collapse(margin):
    """The last rows of real 200-step batch-hard runs of experiments/default.py on squared
    distance: every triplet active, so the gradient and the spread do not depend on α (the
    three runs are identical up to the loss's offset α)."""
    rows = _rows([margin + 0.0016, margin + 0.0015, margin + 0.0015], [0.0059, 0.0057, 0.0055])
    assert sweep.is_collapsed(rows, margin=margin, distance="squared", soft=False) is True


def test_collapse_rule_rejects_an_unknown_distance():
    with pytest.raises(ValueError, match="unknown loss.distance 'manhattan'"):
        sweep.is_collapsed(_rows([0.1], [1.0]), margin=0.2, distance="manhattan", soft=False)


def test_collapse_rule_without_rows_is_unknown():
    assert sweep.is_collapsed([], margin=0.2, distance="squared", soft=False) is None
    assert sweep.is_collapsed([{"step": 1, "loss": None}], margin=0.2, distance="squared",
                              soft=False) is None


# ----------------------------------------------------------------------------------------------
# Aggregation from faked cells.


def _fake_cell(cell_dir, *, accuracy=None, losses=(), spreads=(), active=(), status=None,
               resolved=True):
    cell_dir.mkdir(parents=True)
    rows = [{"step": 25 * (i + 1), "loss": l, "embedding_spread": s, "active_fraction": a}
            for i, (l, s, a) in enumerate(zip(losses, spreads, active))]
    rows.insert(1, {"step": 25, "eval/accuracy": 0.5})  # eval rows have no "loss"
    (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if accuracy is not None:
        (cell_dir / "eval.json").write_text(json.dumps(
            {"accuracy": accuracy, "accuracy_std": 0.01, "val@far=1e-3": accuracy / 2,
             "val@far=1e-3_resolved": resolved, "auc": accuracy + 0.01}))
    if status is not None:
        (cell_dir / sweep.STATUS_FILE).write_text(json.dumps(status))


def _record_cells(spec, workdir):
    """Writes each existing cell folder's sweep_cell.json, as run_sweep does when it starts
    the cell."""
    for name, cell in zip(sweep.cell_names(spec["cells"]), spec["cells"]):
        if (workdir / name).is_dir():
            (workdir / name / sweep.CELL_FILE).write_text(json.dumps(
                sweep.cell_record(spec["base"], spec["common"], cell)))


@pytest.fixture
def faked_sweep(tmp_path):
    cells = [{"loss.strategy": s, "loss.margin": m}
             for s in ("semihard", "hardest") for m in (0.1, 0.5)]
    spec = sweep.load_sweep(_tiny_sweep_file(tmp_path, cells))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(cells)
    _fake_cell(workdir / names[0], accuracy=0.9, losses=(0.3, 0.05, 0.04, 0.03),
               spreads=(1.5, 1.2, 1.1, 1.0), active=(0.8, 0.4, 0.3, 0.2),
               status={"status": "ok", "error": None, "wall_s": 42.0})
    _fake_cell(workdir / names[1], accuracy=0.92, losses=(0.6, 0.4, 0.3, 0.2),
               spreads=(1.5, 1.3, 1.2, 1.1), active=(0.9, 0.7, 0.6, 0.5))
    _fake_cell(workdir / names[2], accuracy=0.5, losses=(0.1, 0.1, 0.1, 0.1),  # collapsed
               spreads=(0.3, 1e-4, 1e-5, 1e-6), active=(1.0, 1.0, 1.0, 1.0),
               status={"status": "ok", "error": None, "wall_s": 40.0}, resolved=False)
    _fake_cell(workdir / names[3], losses=(0.6,), spreads=(1.0,), active=(0.9,),
               status={"status": "crashed", "error": "RuntimeError: out of memory",
                       "wall_s": 5.0})
    _record_cells(spec, workdir)
    key = sweep.baseline_key(sweep.cell_config(spec["base"], {}, cells[0]))
    (workdir / sweep.BASELINE_DIR).mkdir()
    (workdir / sweep.BASELINE_DIR / f"{key}.json").write_text(json.dumps(
        {"accuracy": 0.61, "accuracy_std": 0.02, "auc": 0.66}))
    return spec, workdir, names


def test_aggregate_rows_columns_and_statuses(faked_sweep):
    spec, workdir, names = faked_sweep
    rows = sweep.aggregate(spec, workdir)
    with (workdir / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["name", "loss.strategy", "loss.margin", "loss.distance",
                              *sweep.METRIC_COLUMNS]
    assert [r["name"] for r in table] == names
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "crashed"]
    assert [r["collapsed"] for r in table] == ["False", "False", "True", "False"]
    assert table[0]["loss.distance"] == "squared" and table[0]["accuracy"] == "0.9"
    assert table[0]["final_active_fraction"] == "0.2" and table[0]["wall_s"] == "42.0"
    assert table[1]["wall_s"] == ""  # run elsewhere: no record of its time
    assert table[3]["accuracy"] == "" and table[3]["error"] == "RuntimeError: out of memory"
    assert {r["pixel_accuracy"] for r in table} == {"0.61"}
    assert rows[2]["final_embedding_spread"] == 1e-6
    md = (workdir / "results.md").read_text()
    assert "4 cells: 3 finished, 1 crashed, 0 diverged, 0 not run" in md
    assert "| 0.9000 ± 0.0100 |" in md and "**yes**" in md and "out of memory" in md
    assert "Pixel baseline" in md and "0.6100 ± 0.0200" in md
    # eval.json's unresolved VAL@FAR keeps its flag (it was dropped from the table)
    assert [r["val@far=1e-3_resolved"] for r in table] == ["True", "True", "False", ""]
    assert "| 0.2500* |" in md and "| 0.4500 |" in md and "\\* unresolved" in md
    for plot in (sweep.ACCURACY_PLOT, sweep.ACTIVE_PLOT):
        assert (workdir / plot).stat().st_size > 10_000


def test_aggregate_only_cli_and_pending_cells(faked_sweep, tmp_path):
    spec, workdir, names = faked_sweep
    for name in names[1:]:
        for file in (workdir / name).iterdir():
            file.unlink()
    sweep.main(["--sweep", str(tmp_path / "my_sweep.py"), "--workdir", str(workdir),
                "--aggregate_only"])
    with (workdir / "results.csv").open() as f:
        statuses = [r["status"] for r in csv.DictReader(f)]
    assert statuses == ["ok", "pending", "pending", "pending"]


def test_aggregate_without_any_finished_cell_writes_tables_but_no_plots(tmp_path):
    spec = sweep.load_sweep(_tiny_sweep_file(tmp_path, [{"loss.margin": 0.1}]))
    workdir = tmp_path / "runs"
    key = sweep.baseline_key(sweep.cell_config(spec["base"], {}, {"loss.margin": 0.1}))
    (workdir / sweep.BASELINE_DIR).mkdir(parents=True)
    (workdir / sweep.BASELINE_DIR / f"{key}.json").write_text(
        json.dumps({"accuracy": 0.6, "accuracy_std": 0.0, "auc": 0.6}))
    rows = sweep.aggregate(spec, workdir)
    assert rows[0]["status"] == "pending" and rows[0]["collapsed"] is None
    assert (workdir / "results.md").exists() and not (workdir / sweep.ACCURACY_PLOT).exists()


def test_baseline_key_depends_on_data_seed_and_distance_only():
    base = load_config(DEFAULT)
    key = sweep.baseline_key(base)
    assert sweep.baseline_key(load_config(DEFAULT, {"loss.margin": 0.5})) == key
    for override in ({"data.image_size": 16}, {"seed": 3}, {"eval.distance": "cosine"}):
        assert sweep.baseline_key(load_config(DEFAULT, override)) != key


# ----------------------------------------------------------------------------------------------
# A real sweep: two tiny training cells and one that crashes (subprocesses on one CPU device).

TINY = {**RUNLOCAL_OVERRIDES, "num_steps": 6, "eval_every": 6, "checkpoint_every": 6}


@pytest.mark.slow
def test_real_sweep_end_to_end_with_a_crashing_cell(tmp_path, capsys):
    """The CLI trains one cell, records the other (a folder source without a root) as a
    crashed row, writes the tables and plots, and a second call skips both."""
    cells = [{"loss.strategy": "hardest"}, {"data.source": "folder"}]
    path = _write_sweep(tmp_path, f"""
        def get_sweep():
            return {{"base": "experiments/default.py", "common": {TINY!r}, "cells": {cells!r}}}
    """)
    workdir = tmp_path / "runs"
    env = cli_env()
    command = [sys.executable, "-m", "facenet_jax.sweep", "--sweep", str(path), "--workdir",
               str(workdir)]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    for line in ("[1/2] strategy-hardest: ok", "[2/2] source-folder: crashed in",
                 "1/2 cells finished"):
        assert line in first.stdout
    with (workdir / "results.csv").open() as f:
        ok, crashed = csv.DictReader(f)
    assert (ok["status"], crashed["status"]) == ("ok", "crashed")
    # Every row has every config column, from its own config where the cell did not set it.
    assert (ok["data.source"], crashed["loss.strategy"]) == ("synthetic", "semihard")
    assert 0.0 <= float(ok["accuracy"]) <= 1.0 and ok["pixel_accuracy"] != ""
    assert crashed["accuracy"] == crashed["pixel_accuracy"] == ""
    assert "data.root" in crashed["error"]
    assert all(float(r["wall_s"]) > 0 and r["loss.margin"] == "0.2"
               and r["loss.distance"] == "squared" for r in (ok, crashed))
    log = (workdir / "source-folder" / sweep.LOG_FILE).read_text()
    # A user error is one line, no traceback (train CLI); it names the problem.
    assert log.startswith(f"{sweep.ATTEMPT_MARK} 1, started ") and "error (" in log
    assert len(list((workdir / sweep.BASELINE_DIR).glob("*.json"))) == 1
    assert (workdir / sweep.ACCURACY_PLOT).exists() and (workdir / sweep.ACTIVE_PLOT).exists()
    sweep.main(["--sweep", str(path), "--workdir", str(workdir)])
    assert "2 already finished or failed (skipped), 0 to run" in capsys.readouterr().out
    # The records the real cells left catch a changed common before anything runs.
    path.write_text(path.read_text().replace("'num_steps': 6", "'num_steps': 8"))
    with pytest.raises(sweep.StaleCellsError,
                       match="strategy-hardest, source-folder: num_steps was 6, now 8"):
        sweep.main(["--sweep", str(path), "--workdir", str(workdir)])
