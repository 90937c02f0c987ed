"""What a run folder records and who may read it: its layout version (a folder of another one
is refused by every reader, in one line naming what to check out), a resume from a moved
data.root (accepted when the split record's names and image counts match), and a fine-tune's
record of where it started (its source and step, its step-0 baseline, the keys that differ
when the source does not fit)."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from facenet_jax import checkpoints, data, finetune, parallel, runfiles
from facenet_jax.eval import crossval, evaluate
from facenet_jax import config as cfg
from facenet_jax import sweep, train
from facenet_jax.eval.embed import load_encoder
from facenet_jax.logs import read_metrics
from tiny import xla_flags
from facenet_jax.state import build_model, build_optimizer, create_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.py"
# 8 test devices (conftest): P and the eval batch divide by 8.
TINY = {"num_steps": 2, "checkpoint_every": 2, "eval_every": 100, "log_every": 1,
        "data.image_size": 16, "data.synthetic.num_identities": 40,
        "data.synthetic.images_per_identity": 3, "batch.identities": 8,
        "batch.images_per_identity": 2, "data.pairs.pairs_per_fold": 5, "eval.batch_size": 64,
        "model.embedding_dim": 16, "optimizer.schedule": "constant"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _config(**overrides):
    return cfg.load_config(DEFAULT, {**TINY, **overrides})


def _record(**provenance):
    return {"config": {}, "provenance": provenance}


def _set_layout(workdir, **provenance):
    """Hand-edits DIR/config.json's provenance (None values delete the key)."""
    path = workdir / runfiles.CONFIG_FILE
    record = json.loads(path.read_text())
    for key, value in provenance.items():
        if value is None:
            record["provenance"].pop(key, None)
        else:
            record["provenance"][key] = value
    path.write_text(json.dumps(record))
    return path.read_text()


# ----------------------------------------------------------------------------------------------
# The layout version.


def test_check_layout_names_the_version_the_commit_and_what_to_check_out(tmp_path):
    runfiles.check_layout(_record(layout_version=runfiles.LAYOUT_VERSION), tmp_path)
    cases = [
        (_record(git_commit=COMMIT), ["layout version none", f"commit {COMMIT}",
                                      f"`git checkout {COMMIT}`"]),
        (_record(layout_version=runfiles.LAYOUT_VERSION + 1, git_commit=COMMIT),
         [f"layout version {runfiles.LAYOUT_VERSION + 1}", f"`git checkout {COMMIT}`"]),
        (_record(layout_version=0, git_commit=None, versions={"facenet_jax": "0.1.0"}),
         ["layout version 0", "facenet_jax 0.1.0 (no commit recorded)",
          "check out the facenet_jax 0.1.0 release"]),
        ({"config": {}}, ["layout version none", "no commit or version recorded"]),
    ]
    for record, parts in cases:
        with pytest.raises(ValueError) as error:
            runfiles.check_layout(record, tmp_path)
        message = str(error.value)
        assert "\n" not in message, message
        assert str(tmp_path) in message
        assert f"reads layout version {runfiles.LAYOUT_VERSION} only" in message
        for part in parts:
            assert part in message, (part, message)


def test_config_json_records_the_layout_version_beside_the_commit(tmp_path):
    runfiles.write_config(tmp_path, _config())
    provenance = runfiles.read_run_record(tmp_path)["provenance"]
    assert provenance["layout_version"] == runfiles.LAYOUT_VERSION
    assert "git_commit" in provenance and "init_from" not in provenance
    assert runfiles.read_run_record(tmp_path / "nothing") is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run: 2 steps, a checkpoint at step 2, its final evaluations."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train_and_evaluate(_config(), workdir)
    return workdir


@pytest.mark.slow
def test_every_reader_refuses_a_run_folder_of_another_layout(trained, tmp_path):
    """A copy of a finished run whose config.json predates layout versions (the key deleted by
    hand, as in every folder written before it) or names another: resume, evaluate, load_encoder
    (embed, verification sets, IJB), model.init_from, crossval and the sweep's records and
    tables all stop with the one-line refusal, and nothing in the folder changes."""
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    for layout in (None, runfiles.LAYOUT_VERSION + 1):
        before = _set_layout(old, layout_version=layout, git_commit=COMMIT)
        refusal = (rf"layout version {'none' if layout is None else layout}.*"
                   rf"git checkout {COMMIT}")
        with pytest.raises(ValueError, match=refusal):  # resume
            train.train_and_evaluate(_config(num_steps=4), old)
        with pytest.raises(ValueError, match=refusal):
            evaluate.evaluate_workdir(old, data_root=None, pairs_file=None,
                                      output=tmp_path / "eval.json")
        with pytest.raises(ValueError, match=refusal):
            load_encoder(old, mesh=parallel.make_mesh(1))
        with pytest.raises(ValueError, match=refusal):  # fine-tune
            train.train_and_evaluate(_config(**{"model.init_from": str(old)}), tmp_path / "ft")
        with pytest.raises(ValueError, match=refusal):
            crossval.fold_is_done(old, _config())
        assert (old / runfiles.CONFIG_FILE).read_text() == before
    assert not (tmp_path / "eval.json").exists()
    assert not (tmp_path / "ft" / "checkpoints").exists()
    assert checkpoints.latest_step(old) == 2

    # A sweep whose cell folder holds such a run: its records check and its tables refuse.
    spec_file = tmp_path / "layout_sweep.py"
    spec_file.write_text(f"def get_sweep():\n    return {{'base': {str(DEFAULT)!r}, "
                         f"'common': {json.dumps(TINY)}, 'cells': [{{'loss.margin': 0.2}}]}}\n")
    spec = sweep.load_sweep(spec_file)
    cells = tmp_path / "cells"
    shutil.copytree(old, cells / sweep.cell_names(spec["cells"])[0])
    with pytest.raises(ValueError, match=refusal):
        sweep.check_records(spec, cells)
    with pytest.raises(ValueError, match=refusal):
        sweep.aggregate(spec, cells)
    assert not (cells / sweep.RESULTS_MD).exists()


@pytest.mark.slow
def test_the_train_cli_refuses_an_old_folder_in_one_line_with_status_2(trained, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    _set_layout(old, layout_version=None, git_commit=COMMIT)
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    overrides = [f"--config.{key}={value}" for key, value in TINY.items()]
    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.train", "--config", str(DEFAULT), "--workdir",
         str(old), *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"{old} is a run folder of layout version none" in errors[0]
    assert f"`git checkout {COMMIT}`" in errors[0]


# ----------------------------------------------------------------------------------------------
# A resume from a moved data.root.


def _face_folder(root, identities=40, images=3, seed=0):
    """identities × images 16 px PNGs of noise (each identity its own mean colour)."""
    rng = np.random.default_rng(seed)
    for i in range(identities):
        for j in range(images):
            path = root / f"person_{i:02d}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(6 * i, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
    return root


@pytest.mark.slow
def test_a_resume_from_a_moved_data_root_with_the_same_images_continues(tmp_path, caplog):
    """The same images reached by another path resume (config.json keeps the first root, the
    log names both); a folder whose image counts differ is refused, naming the identity and
    both counts, and the run folder is left as it was."""
    first = _face_folder(tmp_path / "faces")
    moved = tmp_path / "elsewhere" / "faces"
    shutil.copytree(first, moved)
    folder = {"data.source": "folder", "data.cache_dir": str(tmp_path / "cache")}
    run = tmp_path / "run"
    train.train_and_evaluate(_config(**folder, **{"data.root": str(first)}), run)
    counts = json.loads((run / runfiles.SPLIT_FILE).read_text())["image_counts"]
    assert counts == {f"person_{i:02d}": 3 for i in range(40)}

    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(_config(**folder, **{"data.root": str(moved),
                                                      "num_steps": 4}), run)
    assert checkpoints.latest_step(run) == 4
    assert runfiles.read_run_record(run)["config"]["data"]["root"] == str(first)
    assert any(str(moved) in r.getMessage() and str(first) in r.getMessage()
               and "same identities and image counts" in r.getMessage() for r in caplog.records)

    (moved / "person_05" / "2.png").unlink()  # the same people, one image fewer
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=rf"person_05: 3 recorded, 2 now.*data\.root is not the "
                                         rf"folder this run was trained on \({first}\)"):
        train.train_and_evaluate(_config(**folder, **{"data.root": str(moved),
                                                      "num_steps": 6}), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert checkpoints.latest_step(run) == 4
    # Another key than the root still may not change, whatever the data.
    with pytest.raises(ValueError, match=r"loss\.margin: 0\.2 -> 0\.3"):
        train.train_and_evaluate(_config(**folder, **{"data.root": str(first), "num_steps": 6,
                                                      "loss.margin": 0.3}), run)


def test_a_split_record_names_identities_whose_image_count_changed(tmp_path):
    ds = data.Dataset(images=np.zeros((12, 2, 2, 3), np.uint8),
                      labels=np.repeat(np.arange(4), 3).astype(np.int32),
                      identity_names=["a", "b", "c", "d"])
    splits = data.split_identities(ds, fractions=(0.5, 0.0, 0.5), seed=0)
    record = tmp_path / "split.json"
    data.write_split_record(record, splits)
    data.check_split_record(record, splits, moved_from="/old")  # the same: accepted
    fewer = data.Dataset(images=np.zeros((11, 2, 2, 3), np.uint8),
                         labels=np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3], np.int32),
                         identity_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"1 identities hold another number of images \(c: 3 "
                                         r"recorded, 2 now\).*restore them"):
        data.check_split_record(record, data.split_identities(fewer, fractions=(0.5, 0.0, 0.5),
                                                              seed=0))


# ----------------------------------------------------------------------------------------------
# Fine-tuning: the source that does not fit, the source recorded, the baseline shown.


def _run_folder(workdir, config):
    """A run folder holding a fresh train state of `config` at step 0 (no training)."""
    workdir.mkdir(parents=True)
    runfiles.write_config(workdir, config)
    model, (tx, _) = build_model(config, bn_axis_name=None), build_optimizer(config)
    state = create_train_state(config, model, tx)
    manager = checkpoints.make_manager(workdir, max_to_keep=1)
    checkpoints.save(manager, 0, parallel.put_replicated(state, parallel.make_mesh(1)))
    return workdir


def test_an_init_from_that_does_not_fit_names_the_keys_that_differ(tmp_path):
    source = _run_folder(tmp_path / "source", _config(**{"model.small_cnn.widths": (8, 8)}))

    def fine_tune(**overrides):
        config = _config(**{"model.init_from": str(source), **overrides})
        model, (tx, _) = build_model(config, bn_axis_name=None), build_optimizer(config)
        with pytest.raises(ValueError) as error:
            finetune.initial_state(config, model, tx, resuming=False)
        return str(error.value)

    message = fine_tune()  # today's default widths (16, 32, 64, 128)
    assert "The configs differ in model.small_cnn.widths: [8, 8] there, [16, 32, 64, 128] here" \
        in message
    assert "model.bn_scale" not in message and "model.embedding_dim" not in message
    message = fine_tune(**{"model.small_cnn.widths": (8, 8), "model.embedding_dim": 8})
    assert "model.embedding_dim: 16 there, 8 here" in message and "widths" not in message
    # Another encoder: its name, not the fields of two blocks that cannot be compared.
    message = fine_tune(**{"model.name": "resnet18"})
    assert "model.name: 'small_cnn' there, 'resnet18' here" in message
    assert "model.small_cnn" not in message.split("The configs differ in")[1]
    assert "model.resnet18" not in message.split("The configs differ in")[1]


@pytest.mark.slow
def test_a_fine_tune_logs_its_source_shows_its_baseline_and_records_both(trained, tmp_path,
                                                                         caplog):
    source = tmp_path / "source"
    shutil.copytree(trained, source)
    run = tmp_path / "tuned"
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(_config(**{"model.init_from": str(source)}), run)
    lines = [r.getMessage() for r in caplog.records]
    assert f"initialised from {source.resolve()} (step 2)" in lines
    step0 = next(row for row in read_metrics(run) if row["step"] == 0)
    baseline = [line for line in lines if line.startswith("fine-tune baseline")]
    assert baseline == [
        f"fine-tune baseline (model.init_from={source}) on the validation split at step 0: "
        f"accuracy {step0['eval/accuracy']:.4f} ± {step0['eval/accuracy_std']:.4f}, AUC "
        f"{step0['eval/auc']:.4f} ({step0['eval/num_pairs']} pairs)"]
    recorded = {"path": str(source.resolve()), "step": 2}
    assert runfiles.read_run_record(run)["provenance"]["init_from"] == recorded
    # A resume never reads the source again (here gone), and keeps what it recorded.
    shutil.rmtree(source)
    train.train_and_evaluate(_config(**{"model.init_from": str(source), "num_steps": 4}), run)
    assert checkpoints.latest_step(run) == 4
    assert runfiles.read_run_record(run)["provenance"]["init_from"] == recorded
