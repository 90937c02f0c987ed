"""The train CLI end to end: its outputs, resume after a kill, preemption, bad resumes."""

import json
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import REPO, RUNLOCAL, RUNLOCAL_OVERRIDES, cli_env, train_cli

# The runlocal preset as --config flags on experiments/default.py (kept for commands built by
# hand; `--config experiments/default.py:runlocal` is the same config).
TINY = [f"--config.{key}={value}" for key, value in RUNLOCAL_OVERRIDES.items()]

TRAIN_KEYS = {"step", "loss", "active_fraction", "mean_d_ap", "mean_d_an", "learning_rate",
              "grad_norm", "images_per_second"}
EVAL_KEYS = {"accuracy", "accuracy_std", "threshold", "val@far=1e-3", "val@far=1e-3_std",
             "far@far=1e-3", "val@far=1e-2", "auc", "eer", "num_pairs", "num_folds",
             "recall@1", "recall@5", "r_precision", "map@r", "oneshot_top1"}


def _env(**extra):
    """2 devices: the shared trained run's, so a resumed run here matches it bit for bit."""
    return cli_env(devices=2, **extra)


def _train(workdir, *overrides, check=True, env=None, timeout=240, kill_after_step=None):
    """The train CLI on the runlocal preset; kill_after_step=S: SIGKILLed right after step S
    (tests/kill_worker.py)."""
    program = (("-m", "facenet_jax.train") if kill_after_step is None
               else (str(REPO / "tests" / "kill_worker.py"), str(kill_after_step)))
    return train_cli(workdir, *overrides, env=env or _env(), check=check, timeout=timeout,
                     program=program)


def _params(workdir):
    from facenet_jax.eval.embed import load_encoder
    from facenet_jax import parallel
    import jax

    encoder = load_encoder(workdir, mesh=parallel.make_mesh(1))
    return encoder.step, [np.asarray(x) for x in jax.tree.leaves(encoder.variables)]


@pytest.fixture
def straight_run(trained_run):
    """The session's trained run (conftest.trained_run): runlocal, 2 devices, 8 steps."""
    return trained_run


def test_outputs_and_their_keys(straight_run):
    workdir, result = straight_run
    assert "accuracy" in result.stdout  # the summary is printed at the end
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["loss"]["margin"] == 0.2
    assert {"versions", "git_commit", "device_kind", "device_count", "process_count"} <= set(
        saved["provenance"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert all(TRAIN_KEYS <= set(r) for r in train_rows)
    assert [r["step"] for r in eval_rows] == [4, 8]
    assert "eval/accuracy" in eval_rows[0]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "4", "8"]
    evaluation = json.loads((workdir / "eval.json").read_text())
    assert EVAL_KEYS <= set(evaluation)
    assert evaluation["step"] == 8 and evaluation["num_folds"] == 10
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert (workdir / "eval_roc.png").stat().st_size > 0
    split = json.loads((workdir / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "validation", "test")] == [32, 4, 4]
    assert any((workdir / "tensorboard").iterdir())


def _faces_folder(root: pathlib.Path, identities: int = 3, per_identity: int = 2):
    """A small image folder (PNG) of synthetic faces: root/<identity>/<n>.png."""
    from PIL import Image

    from facenet_jax.data import load_synthetic

    faces = load_synthetic(num_identities=identities, images_per_identity=per_identity,
                           image_size=24, seed=5)
    for index, (image, label) in enumerate(zip(faces.images, faces.labels)):
        folder = root / f"person_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image)).save(folder / f"{index}.png")
    return root


def _python_m(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    # orbax's per-restore INFO lines are silenced; this package's own lines stay.
    assert not [line for line in result.stderr.splitlines() if "orbax" in line], result.stderr
    return result


@pytest.mark.slow
def test_evaluate_command_line_reproduces_the_runs_evaluation(straight_run, tmp_path):
    workdir, _ = straight_run
    output = tmp_path / "again.json"
    result = _python_m("facenet_jax.evaluate", "--workdir", workdir, "--output", output)
    assert f"wrote {output}" in result.stdout and "accuracy" in result.stdout
    again = json.loads(output.read_text())
    first = json.loads((workdir / "eval.json").read_text())
    assert again["step"] == first["step"] == 8
    for key in EVAL_KEYS:
        assert again[key] == pytest.approx(first[key], abs=1e-6), key


@pytest.mark.slow
def test_evaluation_only_run_repeats_the_runs_final_evaluations(straight_run, tmp_path):
    """`evaluate --evaluators all`: the entries the end of training runs, on the checkpoint,
    write what training wrote (the same numbers, one test/... row at the step)."""
    import shutil

    workdir, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    for name in ("eval.json", "eval_validation.json"):
        (copy / name).unlink()
    result = _python_m("facenet_jax.evaluate", "--workdir", copy, "--evaluators", "all")
    assert f"test ({copy / 'eval.json'})" in result.stdout
    for name in ("eval.json", "eval_validation.json"):
        again = json.loads((copy / name).read_text())
        first = json.loads((workdir / name).read_text())
        assert list(again) == list(first) and again["step"] == first["step"] == 8
        for key in EVAL_KEYS:
            assert again[key] == pytest.approx(first[key], abs=1e-6), (name, key)
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    test_rows = [row for row in rows if "test/accuracy" in row]
    assert [row["step"] for row in test_rows] == [8]
    assert test_rows[0]["test/accuracy"] == pytest.approx(
        json.loads((workdir / "eval.json").read_text())["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_split_scores_the_runs_own_people(straight_run, tmp_path):
    """--split train: the run's training people (split.json), their generated pairs, the
    run's encoder; the validation split's numbers equal the run's own eval_validation.json;
    a folder and a split together are refused."""
    import shutil

    from facenet_jax import data
    from facenet_jax.eval import evaluate, metrics
    from facenet_jax.eval.embed import load_encoder

    workdir, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    result = _python_m("facenet_jax.evaluate", "--workdir", copy, "--split", "train")
    assert f"wrote {copy / 'eval_train.json'}" in result.stdout
    train = json.loads((copy / "eval_train.json").read_text())
    recorded = json.loads((copy / "split.json").read_text())
    encoder = load_encoder(copy)
    splits = data.split_dataset(data.load_dataset(encoder.config.data), encoder.config.data)
    people = splits["train"]
    assert sorted(people.identity_names) == sorted(recorded["train"])
    pairs = data.generate_pairs(people, num_folds=10, pairs_per_fold=20, seed=0)
    e = encoder.embed(np.asarray(people.images))
    d = np.sum((e[pairs.first] - e[pairs.second]) ** 2, axis=1)
    assert train["split"] == "train" and train["num_pairs"] == len(pairs)
    assert train["auc"] == pytest.approx(metrics.roc_auc(d, pairs.is_same), abs=1e-6)
    own = json.loads((copy / "eval_validation.json").read_text())
    _python_m("facenet_jax.evaluate", "--workdir", copy, "--split", "validation")
    again = json.loads((copy / "eval_validation.json").read_text())
    for key in EVAL_KEYS:
        assert again[key] == pytest.approx(own[key], abs=1e-6), key
    refused = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(copy), "--split",
         "train", "--data_root", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True,
        text=True, timeout=240)
    assert refused.returncode != 0 and "drop one of the two" in refused.stderr
    with pytest.raises(ValueError, match="choose one of the run's splits"):
        evaluate.split_and_pairs(encoder.config, split="val")


@pytest.mark.slow
def test_embed_command_line_writes_what_the_api_computes(straight_run, tmp_path):
    from facenet_jax import data, parallel
    from facenet_jax.eval.embed import load_encoder

    workdir, _ = straight_run
    folder = _faces_folder(tmp_path / "faces")
    output = tmp_path / "out" / "embeddings.npz"
    result = _python_m("facenet_jax.embed", "--workdir", workdir, "--data_root", folder,
                       "--output", output)
    assert "wrote 6 embeddings of 3 identities (step 8)" in result.stdout
    saved = np.load(output)
    assert saved["embeddings"].shape == (6, 16) and int(saved["step"]) == 8
    validation = json.loads((workdir / "eval_validation.json").read_text())
    assert (str(saved["distance"]), str(saved["threshold_split"])) == ("squared", "validation")
    assert float(saved["threshold"]) == validation["threshold"]
    np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
    assert list(saved["identity_names"]) == ["person_0", "person_1", "person_2"]
    encoder = load_encoder(workdir, mesh=parallel.make_mesh(1))
    images = data.load_image_folder(folder, image_size=16, min_images_per_identity=1)
    assert list(saved["labels"]) == list(images.labels)
    np.testing.assert_allclose(saved["embeddings"], encoder.embed(images.images), atol=1e-5)
    # np.savez's naming, kept through the atomic write: no suffix gets ".npz".
    result = _python_m("facenet_jax.embed", "--workdir", workdir, "--data_root", folder,
                       "--output", tmp_path / "out" / "again")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "again.npz")["embeddings"],
                                  saved["embeddings"])
    assert sorted(p.name for p in output.parent.iterdir()) == ["again.npz", "embeddings.npz"]


@pytest.mark.slow
def test_resume_after_kill_gives_identical_parameters(straight_run, tmp_path):
    straight, _ = straight_run
    killed = _train(tmp_path, check=False, kill_after_step=6)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "4").is_dir() and not (tmp_path / "eval.json").exists()
    _train(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [2, 4, 6, 8], "lines past the restored step are dropped, no repeats"
    step_a, params_a = _params(straight)
    step_b, params_b = _params(tmp_path)
    assert step_a == step_b == 8
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    # TensorBoard: the resumed run marks step 5 as purged, so the killed attempt's step 6 is
    # hidden; applying TensorBoard's rule leaves each step once.
    events = _tensorboard_events(tmp_path / "tensorboard")
    starts = [(i, e.step) for i, (_, e) in enumerate(events) if e.HasField("session_log")]
    assert [step for _, step in starts] == [5]
    visible = [e.step for i, (_, e) in enumerate(events) if _is_loss(e)
               and not (i < starts[0][0] and e.step >= 5)]
    assert visible == [2, 4, 6, 8]


def _tensorboard_events(folder: pathlib.Path) -> list:
    """(file, Event) in writing order, read from the TFRecord files (8-byte length, 4-byte CRC,
    the Event proto, 4-byte CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):  # names start with the time
        raw, offset = path.read_bytes(), 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = Event()
            event.ParseFromString(raw[offset + 12:offset + 12 + length])
            events.append((path.name, event))
            offset += 12 + length + 4
    return events


def _is_loss(event) -> bool:
    return any(value.tag == "loss" for value in event.summary.value)


def test_changed_config_on_resume_names_the_keys(straight_run):
    workdir, _ = straight_run
    result = _train(workdir, "--config.loss.margin=0.5", check=False)
    assert result.returncode != 0
    assert "loss.margin" in result.stderr and "0.2" in result.stderr


def test_num_steps_below_reached_step_is_an_error(straight_run):
    workdir, _ = straight_run
    result = _train(workdir, "--config.num_steps=4", check=False)
    assert result.returncode != 0 and "num_steps" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "facenet_jax.train", "--config", RUNLOCAL, "--workdir",
           str(tmp_path), "--config.num_steps=100000", "--config.checkpoint_every=100000"]
    process = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 100000


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path):
    result = _train(tmp_path, "--config.optimizer.name=sgd",
                    "--config.optimizer.learning_rate=1e38",
                    "--config.optimizer.grad_clip_norm=0.0", "--config.log_every=1",
                    check=False)
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr and "last good checkpoint" in result.stderr
    assert not (tmp_path / "checkpoints" / "8").exists()


def test_evaluating_a_folder_never_replaces_another_evaluation(straight_run, tmp_path):
    """eval.json is the run's test-split result (sweeps read it): evaluating a folder into it
    is refused before anything loads; into its own file it works and may be repeated."""
    from facenet_jax.eval import evaluate

    workdir, _ = straight_run
    before = (workdir / "eval.json").read_text()
    folder = _faces_folder(tmp_path / "faces", identities=4, per_identity=3)
    with pytest.raises(FileExistsError, match=r"eval\.json holds the evaluation of the run's "
                       r"test split; evaluating .*faces \(generated pairs\) would replace it\. "
                       r"Pass --output FILE \(e\.g\. .*eval_faces\.json\)"):
        evaluate.evaluate_workdir(workdir, data_root=str(folder), pairs_file=None,
                                  output=workdir / "eval.json")
    assert (workdir / "eval.json").read_text() == before
    own = tmp_path / "eval_faces.json"
    for _ in range(2):  # the same evaluation again may overwrite its own file
        result = evaluate.evaluate_workdir(workdir, data_root=str(folder), pairs_file=None,
                                           output=own)
        assert result["data_root"] == str(folder.resolve()) and result["num_pairs"] == 20
    with pytest.raises(FileExistsError, match=r"holds the evaluation of .*faces"):
        evaluate.evaluate_workdir(workdir, data_root=None, pairs_file=None, output=own)


def test_evaluating_a_run_on_a_changed_split_is_refused(straight_run, tmp_path):
    """The data changed after training (one more identity reshuffles the split): evaluating
    the run's "test split" would include trained identities, so it stops and says why."""
    import shutil

    from facenet_jax.eval import evaluate

    workdir = tmp_path / "copy"
    shutil.copytree(straight_run[0], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    saved["config"]["data"]["synthetic"]["num_identities"] = 41
    (workdir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"identity split differs from the one recorded in "
                                         r".*split\.json .*new --workdir"):
        evaluate.evaluate_workdir(workdir, data_root=None, pairs_file=None,
                                  output=tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()


def test_evaluating_a_folder_caches_it_where_the_run_config_says(straight_run, tmp_path):
    import shutil

    from facenet_jax.eval import evaluate

    workdir = tmp_path / "copy"
    shutil.copytree(straight_run[0], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    saved["config"]["data"]["cache_dir"] = str(tmp_path / "run_cache")
    (workdir / "config.json").write_text(json.dumps(saved))
    folder = _faces_folder(tmp_path / "faces", identities=4, per_identity=3)
    evaluate.evaluate_workdir(workdir, data_root=str(folder), pairs_file=None,
                              output=tmp_path / "eval_faces.json")
    assert any((tmp_path / "run_cache").iterdir())  # not ~/.cache, which may be read-only


def test_run_outputs_validation_threshold_curves_and_test_results_in_tensorboard(straight_run):
    workdir, result = straight_run
    validation = json.loads((workdir / "eval_validation.json").read_text())
    assert validation["split"] == "validation" and validation["step"] == 8
    assert "validation split" in result.stdout and "test split" in result.stdout
    assert "validation split: " in result.stderr  # the pairs log line names its split
    assert (workdir / "training_curves.png").stat().st_size > 0
    assert (workdir / "eval_validation_roc.png").exists()
    assert "spread" in result.stderr and "collapsed" not in result.stderr
    tags = {value.tag for _, event in _tensorboard_events(workdir / "tensorboard")
            for value in event.summary.value if event.step == 8}
    assert {"test/accuracy", "test/auc", "test/roc", "test/histogram"} <= tags


def test_encoder_distance_and_verify_use_the_runs_distance_and_threshold(straight_run):
    from facenet_jax import data, parallel
    from facenet_jax.eval.embed import load_encoder

    workdir, _ = straight_run
    encoder = load_encoder(workdir, mesh=parallel.make_mesh(1))
    chosen = encoder.threshold_info
    saved = json.loads((workdir / "eval_validation.json").read_text())
    assert (chosen["threshold"], chosen["split"]) == (saved["threshold"], "validation")
    faces = data.load_synthetic(num_identities=3, images_per_identity=2, image_size=16, seed=3)
    a, b = faces.images[[0, 2, 4]], faces.images[[1, 3, 0]]
    e_a, e_b = encoder.embed(a), encoder.embed(b)
    expected = np.sum((e_a - e_b) ** 2, axis=1)  # the run's eval.distance is squared
    np.testing.assert_allclose(encoder.distance(a, b), expected, atol=1e-5)
    np.testing.assert_allclose(encoder.distance(a[0], b[0]), expected[:1], atol=1e-5)
    np.testing.assert_array_equal(encoder.verify(a, b), expected <= chosen["threshold"])
    np.testing.assert_array_equal(encoder.verify(a, b, threshold=1e9), [True] * 3)
    with pytest.raises(ValueError, match="as many images"):
        encoder.distance(a, b[:2])


def test_single_fold_pairs_and_one_fold_are_scored_at_a_threshold_from_elsewhere(
        straight_run, tmp_path, monkeypatch):
    """...embedding only the photos of the people fold 2's pairs name (the other fold's
    people and those in no pair are never read), with the same scores."""
    from facenet_jax import data, parallel
    from facenet_jax.eval import evaluate, metrics
    from facenet_jax.eval.embed import Encoder, load_encoder

    workdir, _ = straight_run
    folder = _faces_folder(tmp_path / "faces", identities=6, per_identity=3)
    faces = data.load_image_folder(folder, image_size=16, min_images_per_identity=1)
    pairs_file = tmp_path / "pairs.txt"
    data.write_pairs(pairs_file, data.generate_pairs(faces, num_folds=2, pairs_per_fold=3,
                                                     seed=0), faces)
    encoder = load_encoder(workdir, mesh=parallel.make_mesh(1))
    pairs = evaluate.select_fold(data.read_pairs(pairs_file, faces), 2)
    d = metrics.pair_distances(encoder.embed(faces.images), pairs.first, pairs.second,
                               "squared")
    run = encoder.threshold_info["threshold"]
    embedded = []
    embed = Encoder.embed
    monkeypatch.setattr(Encoder, "embed",
                        lambda self, images: embedded.append(len(images)) or embed(self, images))
    result = evaluate.evaluate_workdir(workdir, data_root=str(folder), pairs_file=str(pairs_file),
                                       output=tmp_path / "fold2.json", fold=2)
    named = np.unique(faces.labels[np.concatenate([pairs.first, pairs.second])])
    assert embedded == [3 * len(named)] and len(named) < 6
    assert result["num_pairs"] == 6 and result["fold"] == 2 and result["threshold"] == run
    assert result["accuracy"] == pytest.approx(np.mean((d <= run) == pairs.is_same))
    assert "the run's validation split at step 8" in result["threshold_source"]
    assert "identities in the pairs" in result["identification_on"]
    given = evaluate.evaluate_workdir(workdir, data_root=str(folder),
                                      pairs_file=str(pairs_file), output=tmp_path / "t.json",
                                      fold=2, threshold=0.5)
    assert given["accuracy"] == pytest.approx(np.mean((d <= 0.5) == pairs.is_same))
    assert "fixed threshold 0.5000 (given" in evaluate.format_summary(given)
    with pytest.raises(FileExistsError):  # fold 2's file is not fold 1's
        evaluate.evaluate_workdir(workdir, data_root=str(folder), pairs_file=str(pairs_file),
                                  output=tmp_path / "fold2.json", fold=1)


@pytest.mark.slow
def test_hardest_with_a_warmup_and_a_collapse_warning(tmp_path):
    """loss.warmup_strategy=all for 4 steps, then hardest: the mined triplet count says which
    strategy ran (all valid triplets B(K-1)(B-K) = 224 vs one per anchor = 16). α = 30 puts the
    hinge collapse floor (α/10 = 3) above any spread of unit vectors, so the warning fires on the
    third log row, once."""
    result = _train(tmp_path, "--config.loss.strategy=hardest", "--config.loss.margin=30",
                    "--config.loss.warmup_strategy=all", "--config.loss.warmup_steps=4")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_triplets"] for r in rows if "loss" in r] == [224, 224, 16, 16]
    assert result.stderr.count("the embedding has collapsed by step 6") == 1


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(tmp_path / "none")]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error (FileNotFoundError): ") and "config.json not found" in result.stderr
    shown = subprocess.run(cmd, cwd=REPO, env=_env(FACENET_JAX_TRACEBACK="1"),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_evaluate_takes_davidsandbergs_protocol_as_evaluation_only_keys(straight_run, tmp_path):
    """`evaluate --workdir DIR --config.eval.KEY=V`: the run evaluated with angular distance,
    concatenated mirror embeddings, the training folds' mean subtracted and the 0.01 grid: the
    accuracy is that of a port of davidsandberg's calculate_roc on the same embeddings; any
    other key is refused in one line."""
    from test_eval_protocol import sandberg_fold_accuracies

    from facenet_jax.eval import evaluate
    from facenet_jax.eval.embed import load_encoder

    workdir, _ = straight_run
    output = tmp_path / "eval_sandberg.json"
    protocol = {"eval.distance": "angular", "eval.flip": "True", "eval.flip_mode": "concat",
                "eval.subtract_mean": "True", "eval.threshold_search": "grid"}
    _python_m("facenet_jax.evaluate", "--workdir", workdir, "--output", output,
              *(f"--config.{key}={value}" for key, value in protocol.items()))
    saved = json.loads(output.read_text())
    assert (saved["distance"], saved["flip"], saved["flip_mode"], saved["subtract_mean"],
            saved["threshold_search"]) == ("angular", True, "concat", True, "grid")
    assert saved["config"]["eval"]["flip_mode"] == "concat"
    encoder = load_encoder(workdir, eval_overrides=protocol)
    test, pairs = evaluate.split_and_pairs(encoder.config, workdir / "split.json")
    embeddings = encoder.embed(np.asarray(test.images))
    assert embeddings.shape[1] == 2 * 16  # [original | mirror]
    assert np.all(np.diff(pairs.fold) >= 0) and len(set(np.bincount(pairs.fold))) == 1
    want = sandberg_fold_accuracies(embeddings[pairs.first].astype(np.float64),
                                    embeddings[pairs.second].astype(np.float64),
                                    pairs.is_same, len(np.unique(pairs.fold)), 1, True)
    assert saved["accuracy"] == pytest.approx(np.mean(want), abs=1e-12)
    assert json.loads((workdir / "config.json").read_text())["config"]["eval"][
        "distance"] == "squared"  # the run's own record is untouched
    refused = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(workdir), "--output",
         str(tmp_path / "x.json"), "--config.loss.margin=0.3"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error (ValueError): --config.loss.margin: an evaluation may change only the "
        "evaluation-only keys (eval.flip, eval.batch_size, eval.distance, eval.flip_mode, "
        "eval.subtract_mean, eval.threshold_search); the other keys are the trained run's")
