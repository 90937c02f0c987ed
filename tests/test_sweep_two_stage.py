"""Two-stage sweeps (a cell that starts from another cell's encoder, stages.from_cell) with a
fake train: references resolved to the same seed's run folder, --list, run order (one at a
time and --parallel), --cell refused before its source run, and staleness after the source is
re-run; the tables of classification rows (head, s, m; spread-only collapse flag)."""

import csv
import json
import pathlib
import re
import sys
import textwrap

import pytest

from facenet_jax import sweep
from facenet_jax.collapse import is_spread_collapsed, spread_collapse_warning
from facenet_jax.config import flatten, to_plain
from facenet_jax.sweep import kinds, stages

REPO = pathlib.Path(__file__).resolve().parents[1]
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=-]+$")
ARCFACE = {"loss.kind": "classification", "num_steps": 6}
FINETUNE = {"model.init_from": stages.from_cell(ARCFACE), "num_steps": 7}
OTHER = {"loss.strategy": "hardest", "loss.soft": True}
# What a sweep table shows first once a row trains a margin-softmax head.
HEAD_COLUMNS = ("loss.kind", "loss.classification.head", "loss.classification.scale",
                "loss.classification.margin")

# The train CLI's stand-in: `python FAKE CELL_DIR INIT_FROM`. It fails, like the train CLI,
# when INIT_FROM is given but holds no finished run, records what it started from, and writes
# an eval.json that differs per attempt (a re-run trains other weights). CELL_DIR/../plan.json
# gives per cell the actions of its attempts ("ok", "fail", "wait_for:NAME": ok once cell NAME
# has started).
FAKE = """
import json, pathlib, sys, time
cell, init_from = pathlib.Path(sys.argv[1]), sys.argv[2]
plan_path = cell.parent / "plan.json"
plan = json.loads(plan_path.read_text())
runs = plan.setdefault("runs", {})
runs[cell.name] = runs.get(cell.name, 0) + 1
plan_path.write_text(json.dumps(plan))
if init_from:
    if not (pathlib.Path(init_from) / "eval.json").exists():
        sys.exit(f"ValueError: model.init_from={init_from} holds no complete checkpoint")
    (cell / "started_from.txt").write_text(init_from)
todo = plan.get("actions", {}).get(cell.name, ["ok"])
action = todo[min(runs[cell.name], len(todo)) - 1]
if action == "fail":
    sys.exit("ValueError: fake failure")
if action.startswith("wait_for:"):  # still running when cell NAME starts
    deadline = time.monotonic() + 60
    while not (cell.parent / action[len("wait_for:"):]).exists():
        if time.monotonic() > deadline:
            sys.exit("ValueError: the awaited cell never started")
        time.sleep(0.01)
(cell / "eval.json").write_text(json.dumps({"accuracy": 0.9, "accuracy_std": 0.01,
                                            "attempt": runs[cell.name]}))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    monkeypatch.setattr(sweep, "train_command",
                        lambda base, workdir, overrides, python="python":
                        [python, str(script), str(workdir),
                         overrides.get("model.init_from") or ""])

    def set_actions(workdir, actions):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "plan.json").write_text(json.dumps({"actions": actions}))
        return lambda: json.loads((workdir / "plan.json").read_text()).get("runs", {})
    return set_actions


def _sweep_file(folder, cells, seeds=(0, 1)):
    path = folder / "two_stage.py"
    path.write_text(textwrap.dedent(f"""
        def get_sweep():
            return {{"base": "experiments/default.py", "cells": {cells!r},
                    "seeds": {list(seeds)!r}}}
    """))
    return path


# ----------------------------------------------------------------------------------------------
# References.


def test_from_cell_names_the_source_and_resolves_to_its_run_at_the_same_seed(tmp_path, capsys):
    path = _sweep_file(tmp_path, [ARCFACE, OTHER, FINETUNE])
    spec = sweep.load_sweep(path)
    names = sweep.cell_names(spec["cells"])
    # runs: ARCFACE s0, s1; OTHER s0, s1; FINETUNE s0, s1
    assert sweep.run_sources(spec["cells"]) == [None, None, None, None, 0, 1]
    assert FINETUNE["model.init_from"] == "@cell:kind-classification__num_steps-6"
    assert names[4] == "init_from-kind-classification+num_steps-6__num_steps-7__seed-0"
    assert all(SAFE_NAME.match(n) and not re.search(r"_[0-9a-f]{8}$", n) for n in names)
    sweep.main(["--sweep", str(path), "--workdir", str(tmp_path / "runs"), "--list"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[4].startswith(f"4 {names[4]} ") and lines[4].endswith(" <- after run 0")
    assert lines[5].endswith(" <- after run 1") and "after run" not in lines[0] + lines[3]
    commands = {name: command for name, _, command in sweep.plan(spec, tmp_path / "runs")}
    workdir = (tmp_path / "runs").resolve()
    assert f"--config.model.init_from={workdir / names[0]}" in commands[names[4]]
    assert f"--config.model.init_from={workdir / names[1]}" in commands[names[5]]
    assert not any("init_from" in arg for arg in commands[names[0]])


@pytest.mark.parametrize("cells, message", [
    ([FINETUNE, ARCFACE], "list the source cell before"),
    ([ARCFACE, {"model.init_from": "@cell:nope", "num_steps": 7}], "no cell at seed 0 is named"),
])
def test_bad_references_are_refused_when_the_sweep_loads(tmp_path, cells, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep(_sweep_file(tmp_path, cells))


def test_a_reference_in_common_or_with_a_seed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="leave out 'seed'"):
        stages.from_cell({**ARCFACE, "seed": 0})
    with pytest.raises(ValueError, match="belongs in the dependent cells"):
        stages.run_sources([ARCFACE], {"model.init_from": stages.from_cell(ARCFACE)})


# ----------------------------------------------------------------------------------------------
# Running.


def test_a_dependent_runs_after_its_source_and_waits_out_a_failed_one(tmp_path, fake):
    spec = sweep.load_sweep(_sweep_file(tmp_path, [ARCFACE, FINETUNE]))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(spec["cells"])
    runs = fake(workdir, {names[0]: ["fail", "ok"]})
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        records = sweep.run_sweep(spec, workdir, out=stream)
    assert {n: r["status"] for n, r in records.items()} == {
        names[0]: "crashed", names[1]: "ok", names[3]: "ok"}
    assert f"[-] {names[2]}: not started" in out.read_text()
    assert not (workdir / names[2]).exists()
    assert (workdir / names[3] / "started_from.txt").read_text() == str(
        (workdir / names[1]).resolve())
    recorded = json.loads((workdir / names[3] / sweep.CELL_FILE).read_text())
    assert recorded["source"]["run"] == names[1] and len(recorded["source"]["eval_sha1"]) == 40
    # the record keeps the reference, not the folder
    assert recorded["config"]["model"]["init_from"] == FINETUNE["model.init_from"]
    with out.open("w") as stream:
        sweep.run_sweep(spec, workdir, out=stream, rerun_failed=True)
    assert runs() == {names[0]: 2, names[1]: 1, names[2]: 1, names[3]: 1}
    assert (workdir / names[2] / "eval.json").exists()


def test_parallel_runs_start_a_dependent_once_its_source_is_complete(tmp_path, fake):
    spec = sweep.load_sweep(_sweep_file(tmp_path, [ARCFACE, FINETUNE, OTHER], seeds=(0,)))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(spec["cells"])
    fake(workdir, {names[0]: [f"wait_for:{names[2]}"]})
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        records = sweep.run_sweep(spec, workdir, out=stream, parallel=2,
                                  slots=[sweep.Slot("a"), sweep.Slot("b")])
    assert {r["status"] for r in records.values()} == {"ok"}
    started = [line.split()[1] for line in out.read_text().splitlines()
               if line.startswith("[") and line.endswith("...")]
    assert started == [names[0], names[2], names[1]]  # the independent one did not wait


def test_cell_before_its_source_is_a_clear_error_then_runs(tmp_path, fake):
    path = _sweep_file(tmp_path, [ARCFACE, FINETUNE], seeds=(0,))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(sweep.load_sweep(path)["cells"])
    runs = fake(workdir, {})
    argv = ["--sweep", str(path), "--workdir", str(workdir)]
    with pytest.raises(sweep.DependencyError, match=r"run 1 .* starts from run 0 .* Run "
                                                    r"--cell 0 first.*--dependency=afterok"):
        sweep.main([*argv, "--cell", "1"])
    assert runs() == {} and not (workdir / names[1]).exists()
    for index in (0, 1):
        with pytest.raises(SystemExit) as done:
            sweep.main([*argv, "--cell", str(index)])
        assert done.value.code == 0
    assert runs() == {names[0]: 1, names[1]: 1}


def test_a_dependent_whose_record_names_no_source_is_stale(tmp_path):
    source_eval = tmp_path / "source" / "eval.json"
    record = {"config": {}}  # a dependent's sweep_cell.json without its "source" entry
    assert stages.source_changes(record, "source", source_eval) == []  # source not complete
    source_eval.parent.mkdir()
    source_eval.write_text('{"accuracy": 0.9}')
    assert stages.source_changes(record, "source", source_eval) == [
        "its record names no model.init_from source run (source) to check it by"]
    record[sweep.SOURCE_RECORD_KEY] = sweep.source_record("source", source_eval)
    assert stages.source_changes(record, "source", source_eval) == []
    assert stages.source_changes(None, "source", source_eval) == []  # not started


def test_a_dependent_is_stale_once_its_source_is_re_run(tmp_path, fake):
    spec = sweep.load_sweep(_sweep_file(tmp_path, [ARCFACE, FINETUNE], seeds=(0,)))
    workdir = tmp_path / "runs"
    names = sweep.cell_names(spec["cells"])
    fake(workdir, {})
    sweep.run_sweep(spec, workdir, out=sys.stderr)
    assert sweep.check_records(spec, workdir) == {}
    # the source's eval.json rewritten byte for byte (a bit-identical re-run): still valid
    source_eval = workdir / names[0] / "eval.json"
    source_eval.write_bytes(source_eval.read_bytes())
    assert sweep.check_records(spec, workdir) == {}
    # the source re-run (its folder's result removed, the sweep run again): other weights
    source_eval.unlink()
    sweep.run_sweep(spec, workdir, out=sys.stderr)
    stale = sweep.check_records(spec, workdir)
    assert list(stale) == [names[1]]
    assert f"source run {names[0]} was re-run" in stale[names[1]][0]
    with pytest.raises(sweep.StaleCellsError, match=re.escape(names[1])):
        sweep.run_sweep(spec, workdir, out=sys.stderr)
    # its row is stale, and the source's is not
    (workdir / sweep.BASELINE_DIR).mkdir()
    config = sweep.cell_config(spec["base"], {}, spec["cells"][0])
    (workdir / sweep.BASELINE_DIR / f"{sweep.baseline_key(config)}.json").write_text(
        json.dumps({"accuracy": 0.6, "accuracy_std": 0.0, "auc": 0.6}))
    rows = sweep.aggregate(spec, workdir)
    assert [row["status"] for row in rows] == ["ok", "stale"]


# ----------------------------------------------------------------------------------------------
# Classification rows in the tables.


def _fake_cell(cell_dir, *, losses, spreads, accuracy=0.9):
    cell_dir.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "loss": l, "embedding_spread": s}
            for i, (l, s) in enumerate(zip(losses, spreads))]
    (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cell_dir / "eval.json").write_text(json.dumps(
        {"accuracy": accuracy, "accuracy_std": 0.01, "val@far=1e-3": 0.5, "auc": 0.95,
         "oneshot_top1": 0.7}))


def test_classification_rows_show_head_s_m_and_use_the_spread_rule(tmp_path):
    cells = [{"loss.strategy": "semihard"},
             {"loss.kind": "classification"},  # ArcFace, paper s and m
             {"loss.kind": "classification", "loss.classification.head": "cosface",
              "loss.classification.scale": 30.0},
             {"loss.kind": "combined", "loss.triplet_weight": 2.0},
             {"loss.kind": "classification", "loss.classification.head": "softmax",
              "loss.triplet_weight": 2.0}]
    path = tmp_path / "cls.py"
    path.write_text(f"def get_sweep():\n    return {{'base': 'experiments/default.py', "
                    f"'cells': {cells!r}}}\n")
    spec = sweep.load_sweep(path)
    workdir = tmp_path / "runs"
    names = sweep.cell_names(cells)
    pinned = (0.2, 0.2, 0.2)  # the triplet rule's pinned loss (α = 0.2), with a wide spread
    _fake_cell(workdir / names[0], losses=pinned, spreads=(1.0, 1.0, 1.0))
    _fake_cell(workdir / names[1], losses=pinned, spreads=(1.0, 1.0, 1.0))
    _fake_cell(workdir / names[2], losses=(9.0, 8.0, 7.0, 6.0), spreads=(0.5, 0.005, 0.004, 0.003))
    _fake_cell(workdir / names[3], losses=(9.0, 8.0, 7.0), spreads=(0.005, 0.004, 0.003))
    _fake_cell(workdir / names[4], losses=(3.0, 2.0, 1.0), spreads=(1.0, 1.0, 1.0))
    for name, cell in zip(names, cells):  # as run_sweep records each cell it starts
        (workdir / name / sweep.CELL_FILE).write_text(json.dumps(
            sweep.cell_record(spec["base"], spec["common"], cell)))
    (workdir / sweep.BASELINE_DIR).mkdir()
    config = sweep.cell_config(spec["base"], {}, cells[0])
    (workdir / sweep.BASELINE_DIR / f"{sweep.baseline_key(config)}.json").write_text(
        json.dumps({"accuracy": 0.6, "accuracy_std": 0.0, "auc": 0.6}))
    sweep.aggregate(spec, workdir)
    with (workdir / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header[:8] == ["name", *HEAD_COLUMNS, "loss.strategy", "loss.triplet_weight",
                          "loss.margin"]
    assert header.index("oneshot_top1") == header.index("auc") + 1
    cols = ["loss.kind", "loss.strategy", "loss.margin", "loss.classification.head",
            "loss.classification.scale", "loss.classification.margin", "collapsed"]
    shown = [[row[c] for c in cols] for row in table]
    assert shown == [
        ["triplet", "semihard", "0.2", "", "", "", "True"],  # pinned at α: triplet rule
        ["classification", "", "", "arcface", "64.0", "0.5", "False"],  # spread only
        ["classification", "", "", "cosface", "30.0", "0.35", "True"],
        ["combined", "semihard", "0.2", "arcface", "64.0", "0.5", "True"],
        ["classification", "", "", "softmax", "", "", "False"],
    ]
    assert {row["oneshot_top1"] for row in table} == {"0.7"}
    # loss.triplet_weight only where the combined objective reads it
    assert [row["loss.triplet_weight"] for row in table] == ["", "", "", "2.0", ""]
    md = (workdir / "results.md").read_text()
    assert "| classification | cosface | 30 | 0.35 | — | — | — |" in md and "spread half of the rule alone" in md


def _flats(cells):
    return [flatten(to_plain(sweep.cell_config(REPO / "experiments" / "default.py", {}, cell)))
            for cell in cells]


def test_objective_columns_leave_triplet_tables_as_they_were():
    triplet = [{"loss.margin": 0.2}]
    assert sweep.table_columns(triplet, _flats(triplet)) == [
        "loss.margin", "loss.distance", "loss.strategy", *sweep.METRIC_COLUMNS]
    mixed = [{"loss.margin": 0.2}, {"loss.kind": "classification"}]
    with_heads = sweep.table_columns(mixed, _flats(mixed))
    assert with_heads[:7] == [*HEAD_COLUMNS, "loss.margin", "loss.distance", "loss.strategy"]
    metrics = with_heads[7:]
    assert metrics == kinds.with_metrics(sweep.METRIC_COLUMNS, ["oneshot_top1"])
    assert metrics.index("oneshot_top1") == metrics.index("auc") + 1


def test_columns_come_from_the_differences_between_cells(tmp_path):
    """A key no objective declares and no cell sets still becomes a column once the cells'
    configs differ in it (here through a config reference: eval_every follows num_steps in
    this base); a key all cells agree on does not."""
    base = tmp_path / "linked.py"
    base.write_text(textwrap.dedent(f"""
        import runpy
        def get_config(arg=None):
            config = runpy.run_path({str(REPO / "experiments" / "default.py")!r})["get_config"]()
            config.eval_every = config.get_ref("num_steps") * 2
            return config
        """))
    cells = [{"num_steps": 10}, {"num_steps": 20}]
    flats = [flatten(to_plain(sweep.cell_config(base, {}, cell))) for cell in cells]
    assert [flat["eval_every"] for flat in flats] == [20, 40]
    columns = sweep.table_columns(cells, flats)
    assert columns[:5] == ["num_steps", "eval_every", "loss.margin", "loss.distance",
                           "loss.strategy"]
    assert kinds.differing_keys(flats) == ["num_steps", "eval_every"]


def test_a_new_objective_kind_needs_no_teaching():
    """A kind registered only in objectives.OBJECTIVES: its rows show its own leading columns,
    the keys it reads, its collapse rule and metrics; the triplet rows around it stay as they
    were."""
    from facenet_jax import objectives

    triplet = objectives.OBJECTIVES.get("triplet")
    no_memory = objectives.ObjectiveKind(
        build=triplet.build, parts=frozenset({objectives.kinds.LOSS_SETTINGS}),
        has_parameters=False,
        table=objectives.TableSpec(collapsed=lambda rows, flat: None,
                                   leading=("loss.kind", "loss.soft"), metrics=("recall@1",)))
    flats = [{"loss.kind": "triplet", "loss.soft": False, "loss.memory.size": 8},
             {"loss.kind": "plain", "loss.soft": True, "loss.memory.size": 8}]
    with objectives.OBJECTIVES.temporary("plain", no_memory):
        kinds_present = kinds.present_kinds(flats)
        assert kinds.config_columns([{}, {"loss.kind": "plain"}], flats) == [
            "loss.kind", "loss.soft", "loss.margin", "loss.distance", "loss.strategy"]
        assert kinds.extra_metrics(kinds_present) == ["recall@1"]
        assert kinds.objective_values(flats[1], ["loss.soft", "loss.memory.size"]) == {
            "loss.memory.size": None}
        assert kinds.row_collapsed([{"loss": 1.0}], flats[1]) is None
    with pytest.raises(ValueError, match="unknown loss.kind 'plain'; valid kinds: triplet, "
                                         "classification, combined"):
        kinds.present_kinds(flats)


@pytest.mark.parametrize("spreads, expected", [
    ((0.5, 0.009, 0.009, 0.009), True),
    ((0.009, 0.009, 0.011), False),  # the last row is above the floor (0.01 squared)
    ((0.009,), True),  # a finished run is judged on whatever rows it has
    ((), None),
])
def test_spread_rule(spreads, expected):
    rows = [{"loss": 5.0, "embedding_spread": s} for s in spreads]
    assert is_spread_collapsed(rows) is expected
    warned = spread_collapse_warning(rows, step=100)
    assert (warned is not None) == bool(expected and len(spreads) >= 3)


def test_the_pixel_baseline_does_not_depend_on_the_training_sampler():
    pk = sweep.cell_config(REPO / "experiments" / "default.py", {}, {})
    uniform = sweep.cell_config(REPO / "experiments" / "default.py", {},
                                {"data.sampler": "uniform"})
    other_data = sweep.cell_config(REPO / "experiments" / "default.py", {},
                                   {"data.image_size": 24})
    assert sweep.baseline_key(pk) == sweep.baseline_key(uniform) != sweep.baseline_key(
        other_data)
