"""Sweeps beyond one process: --list/--cell (job arrays), --parallel slots and SIGTERM to every
running cell, seeds (the sweep file's field, aggregation over seeds, data.pairs.seed), all with
a fake train process so that nothing compiles."""

import csv
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from facenet_jax import sweep
from facenet_jax.eval import evaluate
from facenet_jax.config import changed_keys, load_config, pairs_seed, to_plain
from facenet_jax.sweep import report, spec

from tiny import RUNLOCAL_OVERRIDES, cli_env

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.py"

# A stand-in for the train CLI, run as `python FAKE CELL_DIR`: it writes what it saw (its CPU
# affinity, CUDA_VISIBLE_DEVICES, start and end times) to CELL_DIR/seen.json and behaves as
# CELL_DIR/../actions.json says for its cell: "ok" (write eval.json), "meet:NAME" (wait until
# cell NAME has started, then as "ok": the two ran at the same time), "fail", or
# "await_sigterm" (like the train CLI: on SIGTERM, exit 0 without eval.json).
FAKE = """
import json, os, pathlib, signal, sys, time
cell = pathlib.Path(sys.argv[1])
cell.mkdir(parents=True, exist_ok=True)
action = json.loads((cell.parent / "actions.json").read_text()).get(cell.name, "ok")
seen = {"cores": sorted(os.sched_getaffinity(0)), "start": time.time(), "pid": os.getpid(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
(cell / "seen.json").write_text(json.dumps(seen))
if action == "fail":
    sys.exit("ValueError: fake failure")
if action == "await_sigterm":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    (cell / "waiting").write_text("")
    if signal.sigtimedwait([signal.SIGTERM], 120) is None:
        sys.exit("ValueError: no SIGTERM reached the cell")
    print("SIGTERM: saved step 2; re-run the same command to resume", file=sys.stderr)
    sys.exit(0)
if action.startswith("meet:"):
    deadline = time.monotonic() + 60
    while not (cell.parent / action[len("meet:"):] / "seen.json").exists():
        if time.monotonic() > deadline:
            sys.exit("ValueError: the other cell never started alongside this one")
        time.sleep(0.01)
(cell / "eval.json").write_text(json.dumps({"accuracy": 0.9, "accuracy_std": 0.01}))
seen["end"] = time.time()
(cell / "seen.json").write_text(json.dumps(seen))
"""

# Runs a sweep with the fake train in its own process (SIGTERM must not reach pytest).
DRIVER = """
import pathlib, sys
from facenet_jax import sweep
script, sweep_file, workdir, parallel = sys.argv[1:]
sweep.train_command = lambda base, cell_dir, overrides, python="python": [
    python, script, str(cell_dir)]
sweep.run_sweep(sweep.load_sweep(sweep_file), pathlib.Path(workdir), parallel=int(parallel),
                slots=[sweep.Slot(f"slot {i}") for i in range(int(parallel))])
print("run_sweep returned", flush=True)
"""


def _sweep_file(folder, cells, *, seeds=None, common=None):
    path = folder / "my_sweep.py"
    path.write_text(textwrap.dedent(f"""
        def get_sweep():
            return {{"base": "experiments/default.py", "cells": {cells!r},
                     "seeds": {seeds!r}, "common": {common or {}!r}}}
    """))
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The sweep runs FAKE instead of the train CLI; returns set_actions(workdir, {name: action})."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    monkeypatch.setattr(sweep, "train_command",
                        lambda base, workdir, overrides, python="python":
                        [python, str(script), str(workdir)])

    def set_actions(workdir, actions):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "actions.json").write_text(json.dumps(actions))
    return set_actions


def _seen(workdir, name):
    return json.loads((workdir / name / "seen.json").read_text())


# ----------------------------------------------------------------------------------------------
# Runs, --list and --cell.


def test_seeds_field_expands_each_cell_seed_fastest_like_grid(tmp_path):
    loaded = sweep.load_sweep(_sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.margin": 0.3}],
                                          seeds=[0, 1, 2]))
    assert loaded["cells"] == sweep.grid({"loss.margin": [0.1, 0.3]}, seeds=[0, 1, 2])
    for seeds, message in (([], "non-empty list of integers"), ([0, "1"], "integers")):
        with pytest.raises(ValueError, match=message):
            sweep.load_sweep(_sweep_file(tmp_path, [{"loss.margin": 0.1}], seeds=seeds))
    with pytest.raises(ValueError, match="set 'seed' and the sweep gives seeds too"):
        sweep.load_sweep(_sweep_file(tmp_path, [{"seed": 4}], seeds=[0]))


def test_list_numbers_every_run_in_the_order_cell_runs_them(tmp_path, capsys):
    path = _sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.strategy": "all"}], seeds=[0, 7])
    sweep.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs"), "--list"])
    assert capsys.readouterr().out.splitlines() == [
        "0 margin-0.1__seed-0 loss.margin=0.1 seed=0",
        "1 margin-0.1__seed-7 loss.margin=0.1 seed=7",
        "2 strategy-all__seed-0 loss.strategy=all seed=0",
        "3 strategy-all__seed-7 loss.strategy=all seed=7"]
    assert not (tmp_path / "runs").exists()


def test_cell_runs_exactly_that_run_checks_only_its_record_and_writes_no_tables(tmp_path, fake,
                                                                               capsys):
    path = _sweep_file(tmp_path, [{"loss.margin": m} for m in (0.1, 0.2, 0.3)])
    workdir = tmp_path / "runs"
    names = sweep.cell_names(sweep.load_sweep(path)["cells"])
    fake(workdir, {names[2]: "fail"})
    # Another run's folder holds a run of another config: it does not stop run 1.
    (workdir / names[0]).mkdir()
    (workdir / names[0] / sweep.CELL_FILE).write_text(json.dumps(
        sweep.cell_record(DEFAULT, {"num_steps": 3}, {"loss.margin": 0.1})))
    with pytest.raises(SystemExit) as ended:
        sweep.main(["--sweep", str(path), "--workdir", str(workdir), "--cell", "1"])
    assert ended.value.code == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["actions.json", *names[:2]]
    assert (workdir / names[1] / "eval.json").exists() and not (workdir / "results.md").exists()
    assert "--aggregate_only" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ended:  # a failed run fails its array task
        sweep.main(["--sweep", str(path), "--workdir", str(workdir), "--cell", "2"])
    assert ended.value.code == 1
    with pytest.raises(sweep.StaleCellsError, match="num_steps was 3, now 1200"):
        sweep.main(["--sweep", str(path), "--workdir", str(workdir), "--cell", "0"])


@pytest.mark.parametrize("args, message", [
    (["--cell", "3"], "--cell 3: the sweep has 3 runs, 0 to 2"),
    (["--cell", "-1"], "--cell -1: the sweep has 3 runs"),
    (["--cell", "0", "--parallel", "2"], "--cell runs one run: drop --parallel"),
    (["--parallel", "0"], "--parallel 0: N must be at least 1"),
    (["--cell", "0", "--list"], "not allowed with argument"),
])
def test_bad_cell_and_parallel_arguments_fail_before_anything_runs(tmp_path, capsys, args,
                                                                   message):
    path = _sweep_file(tmp_path, [{"loss.margin": m} for m in (0.1, 0.2, 0.3)])
    with pytest.raises(SystemExit) as ended:
        sweep.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs"), *args])
    assert ended.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Slots and --parallel.


def test_device_slots_split_gpus_evenly_and_cores_all_used():
    slots = sweep.device_slots(2, gpus=["0", "1", "2", "3", "4"], cores=range(8))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]  # "4" left idle
    assert [s.cores for s in slots] == [None, None]
    slots = sweep.device_slots(3, gpus=None, cores=[7, 0, 1, 2, 3, 4, 5])
    assert [s.cores for s in slots] == [(0, 1, 2), (3, 4), (5, 7)]
    assert [s.label for s in slots] == ["cores 0-2", "cores 3-4", "cores 5,7"]
    assert [s.env for s in slots] == [{}, {}, {}]
    with pytest.raises(ValueError, match="needs one GPU per run, but this host shows 2"):
        sweep.device_slots(3, gpus=["0", "1"], cores=range(8))
    with pytest.raises(ValueError, match="needs a CPU core per run, but this process may use 2"):
        sweep.device_slots(3, gpus=None, cores=[0, 1])


def test_visible_gpus_reads_cuda_visible_devices_then_the_query():
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}, lambda: "0\n1\n") == ["2", "5"]
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: "0\n") is None
    assert sweep.visible_gpus({}, lambda: "0\n1\n") == ["0", "1"]
    assert sweep.visible_gpus({}, lambda: None) is None
    assert sweep.visible_gpus({"JAX_PLATFORMS": "cpu"}, lambda: "0\n") is None
    assert sweep.visible_gpus({"JAX_PLATFORMS": "cuda,cpu"}, lambda: "0\n") == ["0"]


def test_parallel_runs_overlap_each_on_its_own_slot(tmp_path, fake):
    path = _sweep_file(tmp_path, [{"loss.margin": m} for m in (0.1, 0.2, 0.3, 0.4)])
    loaded = sweep.load_sweep(path)
    names = sweep.cell_names(loaded["cells"])
    workdir = tmp_path / "runs"
    fake(workdir, {names[0]: f"meet:{names[1]}", names[1]: f"meet:{names[0]}",
                   names[3]: "fail"})
    cores = sorted(os.sched_getaffinity(0))
    slots = [sweep.Slot("gpu A", env={"CUDA_VISIBLE_DEVICES": "0"}, cores=(cores[0],)),
             sweep.Slot("gpu B", env={"CUDA_VISIBLE_DEVICES": "1"}, cores=(cores[-1],))]
    out = io.StringIO()
    records = sweep.run_sweep(loaded, workdir, parallel=2, slots=slots, out=out)
    assert [records[n]["status"] for n in names] == ["ok", "ok", "ok", "crashed"]
    seen = [_seen(workdir, n) for n in names]
    # The first two started together on the two slots, each pinned to its slot's core.
    assert {(s["cuda"], tuple(s["cores"])) for s in seen[:2]} == {
        ("0", (cores[0],)), ("1", (cores[-1],))}
    assert seen[1]["start"] < seen[0]["end"] and seen[0]["start"] < seen[1]["end"]
    text = out.getvalue()
    assert "2 at once: gpu A; gpu B" in text and f"{names[0]} on gpu A ..." in text
    assert f"] {names[3]}: crashed in" in text and "ValueError: fake failure" in text
    log = (workdir / names[1] / sweep.LOG_FILE).read_text()
    assert log.startswith(f"{sweep.ATTEMPT_MARK} 1, started ") and " on gpu B: " in log


def test_sigterm_reaches_every_running_cell_and_starts_no_other(tmp_path, fake):
    path = _sweep_file(tmp_path, [{"loss.margin": m} for m in (0.1, 0.2, 0.3)])
    names = sweep.cell_names(sweep.load_sweep(path)["cells"])
    workdir = tmp_path / "runs"
    fake(workdir, {names[0]: "await_sigterm", names[1]: "await_sigterm"})
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path / "fake_train.py"), str(path),
         str(workdir), "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((workdir / n / "waiting").exists() for n in names[:2]):
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 0, output
    assert "SIGTERM: stopped after 2 of 3 cells" in output and "run_sweep returned" in output
    for name in names[:2]:
        record = json.loads((workdir / name / sweep.STATUS_FILE).read_text())
        assert record["status"] == "preempted" and "SIGTERM: saved step 2" in record["error"]
        with pytest.raises(ProcessLookupError):
            os.kill(_seen(workdir, name)["pid"], 0)  # no orphan
    assert not (workdir / names[2]).exists()


def test_a_run_another_process_is_training_is_busy_not_failed(tmp_path):
    """Two tasks on one run (a requeued task whose old copy still saves): the newcomer's train
    finds the folder locked. Its sweep leaves the status to the other process and does not
    record a failure that would make later runs skip the cell."""
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / sweep.STATUS_FILE).write_text(json.dumps({"status": "preempted"}))
    refused = ("import sys; sys.exit('RuntimeError: another process (pid 7 on host n1, since t) "
               f"is training in {cell}: the filesystem refused flock; wait')")
    record = sweep.run_cell(["python", "-c", refused], cell, None)
    assert record["status"] == "busy" and "pid 7 on host n1" in record["error"]
    assert json.loads((cell / sweep.STATUS_FILE).read_text()) == {"status": "preempted"}
    assert sweep.needs_run(cell, rerun_failed=False)
    crash = "import sys; sys.exit('ValueError: another process went wrong')"
    assert sweep.run_cell(["python", "-c", crash], cell, None)["status"] == "crashed"


# ----------------------------------------------------------------------------------------------
# Seeds: aggregation, tables, plots.


def _run(seed, accuracy, *, status="ok", collapsed=False, margin=0.1, val=None):
    return {"name": f"m{margin}_s{seed}", "loss.margin": margin, "seed": seed,
            "loss.distance": "squared", "loss.strategy": "semihard",
            "accuracy": accuracy if status == "ok" else None, "accuracy_std": 0.01,
            "val@far=1e-3": val, "auc": None, "final_loss": 0.1, "final_active_fraction": 0.5,
            "final_embedding_spread": 1.0, "collapsed": collapsed if status == "ok" else None,
            "wall_s": 10.0, "status": status, "error": None, "pixel_accuracy": 0.6}


def test_over_seeds_mean_sample_std_n_and_collapsed_count():
    keys = ["loss.margin", "seed", "loss.distance", "loss.strategy"]
    rows = [_run(0, 0.80, val=0.5), _run(1, 0.90, collapsed=True), _run(2, 0.85, val=0.7),
            _run(0, 0.70, margin=0.5), _run(1, None, margin=0.5, status="crashed")]
    first, second = sweep.over_seeds(rows, keys)
    assert "seed" not in first and first["loss.margin"] == 0.1
    assert (first["runs"], first["n"], first["collapsed"], first["status"]) == (3, 3, 1, "ok")
    assert first["accuracy"] == pytest.approx(0.85)
    assert first["accuracy_std"] == pytest.approx(0.05)  # sqrt(((-.05)² + .05² + 0) / 2)
    assert first["val@far=1e-3"] == pytest.approx(0.6)  # over the seeds that have it
    assert first["val@far=1e-3_std"] == pytest.approx(math.sqrt(0.02))
    assert first["auc"] is None and first["auc_std"] is None
    assert (second["runs"], second["n"], second["collapsed"]) == (2, 1, 0)
    assert second["accuracy"] == 0.7 and second["accuracy_std"] is None  # one seed: no std
    assert second["status"] == "1 ok, 1 crashed"
    table = report.markdown_table([first, second], ["loss.margin", "n", "accuracy",
                                                    "accuracy_std", "val@far=1e-3",
                                                    "val@far=1e-3_std", "collapsed"])
    assert table.splitlines()[2:] == ["| 0.1 | 3 | 0.8500 ± 0.0500 | 0.6000 ± 0.1414 | **1/3** |",
                                      "| 0.5 | 1 | 0.7000 (n=1) | — | 0/1 |"]  # not "± 0"


def test_an_unresolved_val_over_seeds_keeps_its_flag_in_the_table():
    """results.md showed VAL@FAR=1e-3 without the "unresolved" flag eval.json carries."""
    keys = ["loss.margin", "seed", "loss.distance", "loss.strategy"]
    rows = [{**_run(0, 0.8, val=0.02), "val@far=1e-3_resolved": False},
            {**_run(1, 0.9, val=0.04), "val@far=1e-3_resolved": False},
            {**_run(0, 0.7, margin=0.5, val=0.5), "val@far=1e-3_resolved": True}]
    first, second = sweep.over_seeds(rows, keys)
    assert first["val@far=1e-3_resolved"] is False and second["val@far=1e-3_resolved"] is True
    table = report.markdown_table([first, second], ["loss.margin", "n", "val@far=1e-3",
                                                    "val@far=1e-3_std",
                                                    "val@far=1e-3_resolved"])
    assert table.splitlines()[2:] == ["| 0.1 | 2 | 0.0300 ± 0.0141* |",
                                      "| 0.5 | 1 | 0.5000 (n=1) |"]
    per_run = report.markdown_table(rows, ["loss.margin", "val@far=1e-3",
                                           "val@far=1e-3_resolved"])
    assert per_run.splitlines()[2:] == ["| 0.1 | 0.0200* |", "| 0.1 | 0.0400* |",
                                        "| 0.5 | 0.5000 |"]


def test_aggregate_with_seeds_keeps_per_seed_rows_and_tabulates_cells(tmp_path):
    path = _sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.margin": 0.5}], seeds=[0, 1],
                       common={"data.pairs.seed": 0})
    loaded = sweep.load_sweep(path)
    workdir = tmp_path / "runs"
    names = sweep.cell_names(loaded["cells"])
    for name, cell, accuracy in zip(names, loaded["cells"], (0.8, 0.9, 0.7, None)):
        (workdir / name).mkdir(parents=True)
        (workdir / name / sweep.CELL_FILE).write_text(json.dumps(  # as run_sweep records it
            sweep.cell_record(loaded["base"], loaded["common"], cell)))
        (workdir / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 0.3, "embedding_spread": 1.0,
                        "active_fraction": 0.5}) + "\n" for s in (1, 2, 3)))
        if accuracy is not None:
            (workdir / name / "eval.json").write_text(json.dumps(
                {"accuracy": accuracy, "accuracy_std": 0.02, "val@far=1e-3": 0.4, "auc": 0.9}))
    config = sweep.cell_config(loaded["base"], loaded["common"], loaded["cells"][0])
    (workdir / sweep.BASELINE_DIR).mkdir()  # one baseline for all: the pairs seed is pinned
    (workdir / sweep.BASELINE_DIR / f"{sweep.baseline_key(config)}.json").write_text(
        json.dumps({"accuracy": 0.6, "accuracy_std": 0.0, "auc": 0.6}))
    rows = sweep.aggregate(loaded, workdir)
    assert len(rows) == 4 and len(list((workdir / sweep.BASELINE_DIR).iterdir())) == 1
    with (workdir / sweep.RESULTS_CSV).open() as f:
        per_seed = list(csv.DictReader(f))
    assert [(r["seed"], r["accuracy"]) for r in per_seed] == [
        ("0", "0.8"), ("1", "0.9"), ("0", "0.7"), ("1", "")]
    with (workdir / sweep.RESULTS_SEEDS_CSV).open() as f:
        cells = list(csv.DictReader(f))
    assert [(c["loss.margin"], c["n"], c["runs"], c["status"]) for c in cells] == [
        ("0.1", "2", "2", "ok"), ("0.5", "1", "2", "1 ok, 1 pending")]
    assert float(cells[0]["accuracy_std"]) == pytest.approx(math.sqrt(0.005))
    md = (workdir / sweep.RESULTS_MD).read_text()
    assert "4 runs (2 cells × seeds): 3 finished" in md
    assert "| 0.8500 ± 0.0707 |" in md and "mean ± sample std (ddof=1) over those seeds" in md
    assert (workdir / sweep.ACCURACY_PLOT).stat().st_size > 10_000


def test_unpinned_pairs_seed_is_warned_about_when_seeds_vary(tmp_path, fake):
    workdir = tmp_path / "runs"
    fake(workdir, {})
    for common, warned in (({}, True), ({"data.pairs.seed": 0}, False)):
        loaded = sweep.load_sweep(_sweep_file(tmp_path, [{"loss.margin": 0.1}], seeds=[0, 1],
                                              common=common))
        assert (spec.unpinned_pairs_warning(loaded) is not None) is warned
    one_seed = sweep.load_sweep(_sweep_file(tmp_path, [{"loss.margin": 0.1}]))
    assert spec.unpinned_pairs_warning(one_seed) is None
    out = io.StringIO()
    sweep.run_sweep(sweep.load_sweep(_sweep_file(tmp_path, [{"loss.margin": 0.1}],
                                                 seeds=[0, 1])), workdir, out=out)
    assert "warning: the runs vary `seed` and with it their evaluation pairs" in out.getvalue()


# ----------------------------------------------------------------------------------------------
# data.pairs.seed.


def test_pairs_seed_defaults_to_seed_and_pins_the_pairs():
    from facenet_jax import data
    tiny = {"data.synthetic.num_identities": 20, "data.synthetic.images_per_identity": 4,
            "data.image_size": 8, "data.pairs.pairs_per_fold": 10}
    test_split = evaluate.split_and_pairs(load_config(DEFAULT, tiny))[0]

    def pairs(**overrides):
        config = load_config(DEFAULT, {**tiny, **overrides})
        generated = evaluate.generated_pairs(config, test_split)
        return generated.first.tolist(), generated.second.tolist()

    # Unset, the pairs are exactly those of generate_pairs with `seed`, as before the key.
    reference = data.generate_pairs(test_split, num_folds=10, pairs_per_fold=10, seed=3)
    assert pairs(seed=3) == (reference.first.tolist(), reference.second.tolist())
    assert pairs(seed=3) != pairs(seed=4)
    assert pairs(seed=3, **{"data.pairs.seed": 0}) == pairs(seed=4, **{"data.pairs.seed": 0})
    assert pairs(seed=3, **{"data.pairs.seed": 0}) == pairs(seed=0)
    assert pairs_seed(load_config(DEFAULT, {"seed": 5})) == 5
    assert pairs_seed(load_config(DEFAULT, {"seed": 5, "data.pairs.seed": 1})) == 1


def test_an_unset_pairs_seed_is_the_same_config_as_one_equal_to_seed():
    current = to_plain(load_config(DEFAULT))
    pinned = to_plain(load_config(DEFAULT, {"data.pairs.seed": 0}))  # = seed: same pairs
    assert changed_keys(current, pinned) == []
    other = to_plain(load_config(DEFAULT, {"data.pairs.seed": 2}))
    assert changed_keys(current, other) == ["data.pairs.seed"]
    assert sweep.record_changes(sweep.cell_record(DEFAULT, {}, {"data.pairs.seed": 0}),
                                sweep.cell_record(DEFAULT, {}, {})) == []


def test_pinning_the_pairs_seed_shares_one_baseline_across_training_seeds():
    key = sweep.baseline_key(load_config(DEFAULT))
    assert sweep.baseline_key(load_config(DEFAULT, {"seed": 4, "data.pairs.seed": 0})) == key
    assert sweep.baseline_key(load_config(DEFAULT, {"seed": 4})) != key
    assert sweep.baseline_key(load_config(DEFAULT, {"data.alignment": "box"})) != key


# ----------------------------------------------------------------------------------------------
# The Slurm array script (run by bash as Slurm would run one array task).

SBATCH = REPO / "experiments" / "slurm" / "sweep_array.sbatch"
TINY = {**RUNLOCAL_OVERRIDES, "log_every": 1, "eval_every": 100_000,
        "checkpoint_every": 100_000, "num_steps": 100_000}


def _array_task(path, workdir, task):
    env = cli_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_SUBMIT_DIR=str(REPO),
                  PYTHON=sys.executable)
    return subprocess.Popen(["bash", str(SBATCH), str(path), str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sbatch_script_passes_the_array_index_as_the_run(tmp_path):
    path = _sweep_file(tmp_path, [{"loss.margin": 0.1}, {"loss.margin": 0.2}])
    task = _array_task(path, tmp_path / "runs", 5)
    output, _ = task.communicate(timeout=60)
    assert task.returncode == 2 and "--cell 5: the sweep has 2 runs, 0 to 1" in output


@pytest.mark.slow
def test_sbatch_script_sigterm_reaches_the_train_process_which_saves(tmp_path):
    """What Slurm's --signal=B:TERM does: SIGTERM to the task's batch process. It is the sweep
    (exec), which passes it to the real train process: a checkpoint, a preempted record."""
    path = _sweep_file(tmp_path, [{"loss.margin": 0.1}], common=TINY)
    workdir = tmp_path / "runs"
    name = sweep.cell_names(sweep.load_sweep(path)["cells"])[0]
    task = _array_task(path, workdir, 0)
    try:
        metrics = workdir / name / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline and task.poll() is None, task.stdout.read()
            time.sleep(0.2)
        cmdline = pathlib.Path(f"/proc/{task.pid}/cmdline").read_bytes().split(b"\0")
        assert b"facenet_jax.sweep" in cmdline  # the script exec'd the sweep
        task.send_signal(signal.SIGTERM)
        output, _ = task.communicate(timeout=120)
    finally:
        task.kill()
    assert task.returncode == 0, output
    record = json.loads((workdir / name / sweep.STATUS_FILE).read_text())
    assert record["status"] == "preempted", record
    assert any(p.name.isdigit() for p in (workdir / name / "checkpoints").iterdir())
    assert not (workdir / sweep.RESULTS_MD).exists()
