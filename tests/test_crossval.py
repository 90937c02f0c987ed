"""The LFW protocol as one command (facenet_jax.crossval): folds' people out of training and
validation, each fold scored once on its own pairs at the validation threshold, the summary,
resume, bad input; the exclude_pairs_fold key and the real lfw_half folds."""

import json
import pathlib

import numpy as np
import pytest

from facenet_jax import config as config_lib
from facenet_jax import data
from facenet_jax.eval import crossval, metrics
from facenet_jax.data.splits import pair_file_identities
from facenet_jax.train.validate import validate_run_config

from tiny import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = [f"Person_{chr(65 + i)}{chr(65 + i)}" for i in range(28)]  # Person_AA ... (LFW-like)
# Two folds of 2 same + 2 different pairs; fold 1 names people 0-3, fold 2 people 4-7.
PAIRS = """2\t2
Person_AA\t1\t2
Person_BB\t1\t3
Person_CC\t2\tPerson_DD\t1
Person_AA\t3\tPerson_CC\t1
Person_EE\t1\t3
Person_FF\t2\t3
Person_GG\t1\tPerson_HH\t3
Person_EE\t2\tPerson_HH\t1
"""
TINY = {"num_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,  # on runlocal
        "data.split.train": 0.75, "data.split.validation": 0.25, "data.split.test": 0.0,
        "data.pairs.num_folds": 2, "data.pairs.pairs_per_fold": 5, "model.embedding_dim": 8}


@pytest.fixture(scope="module")
def lfw_like(tmp_path_factory):
    """An image folder in LFW's layout (Name/Name_0001.jpg, 3 images each) and its pairs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("lfw_like")
    faces = data.load_synthetic(num_identities=len(NAMES), images_per_identity=3,
                                image_size=24, seed=2)
    for row, (image, label) in enumerate(zip(faces.images, faces.labels)):
        name = NAMES[label]
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image)).save(
            root / "images" / name / f"{name}_{row % 3 + 1:04d}.jpg")
    (root / "pairs.txt").write_text(PAIRS)
    return root / "images", root / "pairs.txt"


def _config(images, **overrides):
    return tiny_config({**TINY, "data.source": "folder", "data.root": str(images), **overrides})


def _fold_names(fold):
    return set(NAMES[4 * (fold - 1):4 * fold])


def _no_training(monkeypatch):
    import facenet_jax.train

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(facenet_jax.train, "train_and_evaluate", refuse)


@pytest.mark.slow
def test_crossval_excludes_scores_summarises_and_resumes(lfw_like, tmp_path, monkeypatch):
    import facenet_jax.train

    images, pairs = lfw_like
    config = _config(images)
    out = tmp_path / "cv"
    crossval.run_crossval(config, pairs, out, folds="1")
    assert not (out / "fold_2").exists()
    trained = []
    real = facenet_jax.train.train_and_evaluate

    def counting(config, workdir, **kwargs):
        trained.append(pathlib.Path(workdir).name)
        return real(config, workdir, **kwargs)

    monkeypatch.setattr(facenet_jax.train, "train_and_evaluate", counting)
    summary = crossval.run_crossval(config, pairs, out)
    assert trained == ["fold_2"]  # fold 1 was done: skipped
    for fold in (1, 2):
        run = out / f"fold_{fold}"
        split = json.loads((run / "split.json").read_text())
        held = _fold_names(fold)
        assert not held & (set(split["train"]) | set(split["validation"]))
        assert held <= set(split["test"])
        other = _fold_names(3 - fold)  # the other fold's people are training-side data
        assert not other & set(split["test"])
        # Scored once, on exactly this fold's 4 pairs, at the run's validation threshold:
        # recomputed here from the encoder and the pairs written above.
        result = json.loads((run / crossval.FOLD_EVAL_FILE).read_text())
        validation = json.loads((run / "eval_validation.json").read_text())
        assert result["fold"] == fold and result["num_pairs"] == 4
        assert result["threshold"] == validation["threshold"]
        assert "validation split" in result["threshold_source"]
        _check_scored_by_the_run_encoder(result, run, images, fold)
    # The summary's mean ± std: a hand computation from the per-fold files.
    per_fold = [json.loads((out / f"fold_{k}" / crossval.FOLD_EVAL_FILE).read_text())
                for k in (1, 2)]
    for key in ("accuracy", "roc_val@far=1e-3", "auc"):
        a, b = (r[key] for r in per_fold)
        assert summary["mean"][key] == pytest.approx((a + b) / 2)
        assert summary["std"][key] == pytest.approx(abs(a - b) / np.sqrt(2))  # ddof=1
    saved = json.loads((out / crossval.SUMMARY_FILE).read_text())
    assert [r["fold"] for r in saved["rows"]] == [1, 2] and saved["num_folds"] == 2
    assert all(r["train_seconds"] > 0 for r in saved["rows"])
    table = (out / crossval.TABLE_FILE).read_text()
    assert f"{summary['mean']['accuracy']:.4f} ± {summary['std']['accuracy']:.4f}" in table
    assert (out / crossval.FIGURE_FILE).stat().st_size > 0
    # Everything done: a third run trains nothing and rewrites the same summary.
    trained.clear()
    again = crossval.run_crossval(config, pairs, out)
    assert trained == [] and again["mean"] == summary["mean"]


def _row(fold, accuracy, val=0.5, auc=0.8, resolved=True, seconds=10.0):
    return {"fold": fold, "accuracy": accuracy, "roc_val@far=1e-3": val, "auc": auc,
            "roc_val@far=1e-3_resolved": resolved, "threshold": 0.7, "train_seconds": seconds}


def test_one_fold_prints_n1_not_a_zero_spread():
    """`crossval --folds 1` printed "0.7400 ± 0.0000": one fold has no spread."""
    stats = crossval.summarize([_row(1, 0.74)])
    assert stats["mean"]["accuracy"] == 0.74 and stats["std"]["accuracy"] is None
    assert stats["n"]["accuracy"] == 1
    table = crossval.format_table([_row(1, 0.74)], stats)
    assert "**0.7400 (n=1)**" in table and "± 0.0000" not in table


def test_spread_over_folds_is_the_sample_std():
    """Folds are separate runs: their spread is the sample std (ddof=1), labelled so."""
    rows = [_row(1, 0.70, seconds=10.0), _row(2, 0.80, resolved=False, seconds=None),
            _row(3, 0.90)]
    stats = crossval.summarize(rows)
    assert stats["std"]["accuracy"] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))
    assert stats["std"]["accuracy"] == pytest.approx(0.1)  # by hand: sqrt((.01 + 0 + .01) / 2)
    assert stats["n"]["train_seconds"] == 2 and stats["std"]["train_seconds"] == 0.0
    table = crossval.format_table(rows, stats)
    assert "| **mean ± sample std** | **0.8000 ± 0.1000** |" in table
    assert "| 2 | 0.8000 | 0.5000* |" in table and "\\* unresolved" in table
    assert "ddof=1" in table


def _check_scored_by_the_run_encoder(result, run, images, fold):
    """The fold's accuracy and AUC, recomputed from the run's encoder (its recorded eval.flip
    included) and the fold's pairs written above."""
    from facenet_jax.eval.embed import load_encoder

    lines = PAIRS.splitlines()[1 + 4 * (fold - 1):1 + 4 * fold]
    encoder = load_encoder(run)
    folder = data.load_image_folder(images, 16, min_images_per_identity=1)
    row = {pathlib.Path(p).stem: i for i, p in enumerate(folder.paths)}
    fields = [line.split("\t") for line in lines]
    first = [row[f"{f[0]}_{int(f[1]):04d}"] for f in fields]
    second = [row[f"{f[0]}_{int(f[2]):04d}"] if len(f) == 3 else
              row[f"{f[2]}_{int(f[3]):04d}"] for f in fields]
    e = encoder.embed(np.asarray(folder.images))
    d = np.sum((e[first] - e[second]) ** 2, axis=1)
    same = np.array([len(f) == 3 for f in fields])
    assert result["accuracy"] == pytest.approx(np.mean((d <= result["threshold"]) == same),
                                               abs=1e-9)
    assert result["auc"] == pytest.approx(metrics.roc_auc(d, same), abs=1e-5)


@pytest.mark.slow
def test_a_finished_fold_rescored_with_flip_trains_nothing(lfw_like, tmp_path):
    """eval.flip is evaluation-only (config.EVALUATION_ONLY_KEYS): re-running a finished
    cross-validation with it redoes the validation threshold and the fold's score with mirror
    images added, from the same checkpoint, without a training step."""
    images, pairs = lfw_like
    out = tmp_path / "cv"
    crossval.run_crossval(_config(images), pairs, out, folds="1")
    run = out / "fold_1"
    def trained_steps():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [line for line in lines if '"loss"' in line]

    logged = trained_steps()
    plain = json.loads((run / crossval.FOLD_EVAL_FILE).read_text())
    summary = crossval.run_crossval(_config(images, **{"eval.flip": True}), pairs, out,
                                    folds="1")
    assert trained_steps() == logged  # no step was trained again
    # The re-scored test numbers replace the first ones in the training log.
    test_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"test/' in line]
    assert len(test_rows) == 1
    result = json.loads((run / crossval.FOLD_EVAL_FILE).read_text())
    validation = json.loads((run / "eval_validation.json").read_text())
    assert result["config"]["eval"]["flip"] and not plain["config"]["eval"]["flip"]
    assert result["threshold"] == validation["threshold"] != plain["threshold"]
    _check_scored_by_the_run_encoder(result, run, images, 1)
    assert summary["config"]["eval"]["flip"]


@pytest.mark.parametrize("change, message", [
    (lambda images, pairs, tmp: (pairs.parent / "one_fold.txt", {}),
     "holds 1 fold .*at least 2 folds"),
    (lambda images, pairs, tmp: (pairs, {"data.split.validation": 0.0,
                                         "data.split.train": 1.0}),
     "validation split.*data.split.validation=0.0"),
    (lambda images, pairs, tmp: (pairs, {"data.split.exclude_pairs_file": str(tmp / "x.txt")}),
     "leave the key unset"),
    (lambda images, pairs, tmp: (pairs, {"data.source": "synthetic"}), "data.source='folder'"),
    (lambda images, pairs, tmp: (pairs, {"eval.subtract_mean": True}),
     "fixed one, which subtracts no mean"),
    (lambda images, pairs, tmp: (pairs, {"data.root": str(tmp / "partial")}),
     "(?s)lacks images of the pairs.*Person_BB/Person_BB_0003"),
])
def test_bad_input_is_refused_before_training(lfw_like, tmp_path, monkeypatch, change, message):
    images, pairs = lfw_like
    (pairs.parent / "one_fold.txt").write_text("2\n" + "".join(PAIRS.splitlines(True)[1:5]))
    partial = tmp_path / "partial"
    for name in NAMES:  # every image but Person_BB_0003.jpg
        (partial / name).mkdir(parents=True)
        for f in (images / name).iterdir():
            if f.name != "Person_BB_0003.jpg":
                (partial / name / f.name).write_bytes(f.read_bytes())
    pairs_file, overrides = change(images, pairs, tmp_path)
    _no_training(monkeypatch)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        crossval.run_crossval(_config(images, **overrides), pairs_file, tmp_path / "cv")


@pytest.mark.parametrize("folds, message", [("3", r"folds 1\.\.2"), ("0,1", r"folds 1\.\.2"),
                                            ("a", "comma-separated")])
def test_folds_out_of_range_are_refused(lfw_like, tmp_path, monkeypatch, folds, message):
    images, pairs = lfw_like
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=message):
        crossval.run_crossval(_config(images), pairs, tmp_path / "cv", folds=folds)


def test_exclude_pairs_fold_moves_only_that_folds_people(tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(PAIRS)
    assert pair_file_identities(pairs, fold=1) == _fold_names(1)
    assert pair_file_identities(pairs, fold=2) == _fold_names(2)
    assert pair_file_identities(pairs) == _fold_names(1) | _fold_names(2)
    with pytest.raises(ValueError, match=r"fold 3 of .*folds 1\.\.2"):
        pair_file_identities(pairs, fold=3)
    labels = np.repeat(np.arange(len(NAMES)), 2)
    toy = data.Dataset(images=np.zeros((len(labels), 2, 2, 3), np.uint8), labels=labels,
                       identity_names=NAMES)
    plain = data.split_identities(toy, fractions=(0.5, 0.25, 0.25), seed=3)
    split = data.split_identities(toy, fractions=(0.5, 0.25, 0.25), seed=3,
                                  exclude_pairs_file=pairs, exclude_pairs_fold=2)
    names = {k: set(v.identity_names) for k, v in split.items()}
    before = {k: set(v.identity_names) for k, v in plain.items()}
    assert names["test"] == before["test"] | _fold_names(2)
    for side in ("train", "validation"):
        assert names[side] == before[side] - _fold_names(2)


def test_exclude_pairs_fold_key_defaults_to_every_fold_and_is_validated(tmp_path):
    current = config_lib.to_plain(config_lib.load_config(REPO / "experiments" / "default.py", {
        "data.split.exclude_pairs_file": "p.txt"}))
    assert current["data"]["split"]["exclude_pairs_fold"] is None  # every fold excluded
    one_fold = json.loads(json.dumps(current))
    one_fold["data"]["split"]["exclude_pairs_fold"] = 1
    assert config_lib.changed_keys(current, one_fold) == ["data.split.exclude_pairs_fold"]
    for bad, message in ((0, "fold number >= 1"), (True, "fold number >= 1")):
        config = config_lib.load_config(REPO / "experiments" / "default.py",
                                        {"data.split.exclude_pairs_file": "p.txt"})
        config.data.split.exclude_pairs_fold = bad
        with pytest.raises(ValueError, match=message):
            validate_run_config(config, num_devices=1)
    config = config_lib.load_config(REPO / "experiments" / "default.py",
                                    {"data.split.exclude_pairs_fold": 2})
    with pytest.raises(ValueError, match="exclude_pairs_file, which is unset"):
        validate_run_config(config, num_devices=1)


def test_val_on_roc_hand_computed():
    # same at 0.1, 0.3, 0.6; different at 0.2, 0.5, 0.9, 1.0.
    d = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.9, 1.0])
    same = np.array([1, 0, 1, 0, 1, 0, 0], bool)
    assert metrics.val_on_roc(d, same, 1e-3) == pytest.approx(1 / 3)  # below 0.2: 1 of 3
    assert metrics.val_on_roc(d, same, 0.25) == pytest.approx(2 / 3)  # one of 4 accepted
    assert metrics.val_on_roc(d, same, 0.5) == pytest.approx(1.0)  # up to 0.6: 2 of 4


def test_lfw_half_folds_leave_about_670_trainable_people(shared_data):
    root, pairs = shared_data / "lfw_half", shared_data / "lfw_half_pairs.txt"
    assert crossval.count_folds(pairs) == 5
    _, names = crossval.scan_folder(root)
    counts = {name: sum(1 for _ in (root / name).iterdir()) for name in names}
    folds = [pair_file_identities(pairs, fold=k) for k in range(1, 6)]
    remaining = []
    for k, held in enumerate(folds):
        assert held <= set(counts)
        assert not any(held & other for j, other in enumerate(folds) if j != k)  # disjoint
        remaining.append(sum(1 for name, n in counts.items() if n >= 2 and name not in held))
    # The README's "about 670 people with >= 2 images remain" per fold, fold by fold.
    assert [len(held) for held in folds] == [435, 409, 397, 423, 422]
    assert remaining == [651, 679, 677, 675, 674]
    every = set().union(*folds)
    assert sum(1 for name, n in counts.items() if n >= 2 and name not in every) == 52


def test_command_line_refuses_a_fold_out_of_range_in_one_line(lfw_like, tmp_path):
    import os
    import subprocess
    import sys

    images, pairs = lfw_like
    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.crossval", "--config",
         str(REPO / "experiments" / "default.py"), "--pairs", str(pairs), "--workdir",
         str(tmp_path / "cv"), "--folds", "1,3", "--config.data.source=folder",
         f"--config.data.root={images}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120, check=False)
    assert result.returncode != 0
    assert "--folds '1,3': the pairs file has folds 1..2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cv" / "fold_1").exists()


@pytest.mark.slow
def test_step_0_with_init_from_is_the_imported_row(lfw_like, tmp_path):
    """num_steps=0 with model.init_from: the encoder as it is, scored by the same rule as a
    fine-tuned fold (threshold on the fold run's validation split, here by the grid search),
    from a step-0 checkpoint holding exactly the source's weights; nothing is trained."""
    import jax

    from facenet_jax.eval.embed import load_encoder

    images, pairs = lfw_like
    source = tmp_path / "source"
    crossval.run_crossval(_config(images), pairs, source, folds="1")
    out = tmp_path / "imported"
    config = _config(images, **{"num_steps": 0, "model.init_from": str(source / "fold_1"),
                                "eval.threshold_search": "grid"})
    summary = crossval.run_crossval(config, pairs, out, folds="2")
    run = out / "fold_2"
    assert '"loss"' not in (run / "metrics.jsonl").read_text()  # no training step
    imported, original = load_encoder(run), load_encoder(source / "fold_1")
    assert imported.step == 0
    for a, b in zip(jax.tree.leaves(imported.variables), jax.tree.leaves(original.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    result = json.loads((run / crossval.FOLD_EVAL_FILE).read_text())
    validation = json.loads((run / "eval_validation.json").read_text())
    assert validation["step"] == 0 and validation["threshold_search"] == "grid"
    assert result["threshold"] == validation["threshold"]
    _check_scored_by_the_run_encoder(result, run, images, 2)
    assert summary["rows"][0]["fold"] == 2
    config_lib.set_dotted(config, "model.init_from", None)
    with pytest.raises(ValueError, match="num_steps=0 trains nothing.*model.init_from"):
        validate_run_config(config, num_devices=1)
