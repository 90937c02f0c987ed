"""davidsandberg/facenet's LFW protocol as evaluation options (eval.distance="angular",
eval.flip_mode="concat", eval.subtract_mean, eval.threshold_search="grid"), checked against an
independent port of its src/facenet.py (distance, calculate_roc, calculate_accuracy)."""

import logging
import math

import numpy as np
import pytest
from sklearn.model_selection import KFold

from facenet_jax import config as config_lib
from facenet_jax import data
from facenet_jax.eval import cli as evaluate_cli
from facenet_jax.eval import evaluate, metrics
from facenet_jax.eval.threshold import run_threshold
from facenet_jax.eval.metrics import validate_eval_config
from facenet_jax.train.validate import validate_run_config

# ----------------------------------------------------------------------------------------------
# The port: davidsandberg/facenet src/facenet.py, only what the accuracy needs.


def sandberg_distance(embeddings1, embeddings2, distance_metric):
    if distance_metric == 0:
        return np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    dot = np.sum(np.multiply(embeddings1, embeddings2), axis=1)
    norm = np.linalg.norm(embeddings1, axis=1) * np.linalg.norm(embeddings2, axis=1)
    return np.arccos(dot / norm) / math.pi


def sandberg_accuracy_at(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    return float(tp + tn) / dist.size


def sandberg_fold_accuracies(embeddings1, embeddings2, actual_issame, nrof_folds,
                             distance_metric, subtract_mean):
    """calculate_roc's `accuracy` array (thresholds np.arange(0, 4, 0.01), as src/lfw.py)."""
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(nrof_folds)
    indices = np.arange(len(actual_issame))
    for fold_idx, (train_set, test_set) in enumerate(
            KFold(n_splits=nrof_folds, shuffle=False).split(indices)):
        mean = (np.mean(np.concatenate([embeddings1[train_set], embeddings2[train_set]]), axis=0)
                if subtract_mean else 0.0)
        dist = sandberg_distance(embeddings1 - mean, embeddings2 - mean, distance_metric)
        acc_train = [sandberg_accuracy_at(t, dist[train_set], actual_issame[train_set])
                     for t in thresholds]
        best = thresholds[np.argmax(acc_train)]
        accuracy[fold_idx] = sandberg_accuracy_at(best, dist[test_set], actual_issame[test_set])
    return accuracy


# ----------------------------------------------------------------------------------------------
# Hand-made embeddings: identities around random centres, all shifted by a common offset (what
# subtract_mean removes), each view unit-norm; images reused across pairs (the mean counts an
# image once per pair it is in).


def offset_faces(seed=0, identities=30, per_identity=4, dim=6, offset=2.5, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    labels = np.repeat(np.arange(identities), per_identity)
    bias = offset * np.ones(dim) / np.sqrt(dim)

    def view():
        x = centres[labels] + noise * rng.normal(size=(len(labels), dim)) + bias
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return labels, view(), view()  # the image's and its "mirror's" unit embeddings


def reused_pairs(labels, num_pairs, seed=1):
    """num_pairs pairs, alternately same and different, drawn with replacement (images reused)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for i in range(num_pairs):
        a = rng.integers(len(labels))
        pool = np.flatnonzero((labels == labels[a]) if i % 2 == 0 else (labels != labels[a]))
        pool = pool[pool != a]
        first.append(a)
        second.append(rng.choice(pool))
    first, second = np.array(first), np.array(second)
    return first, second, labels[first] == labels[second]


def kfold_ids(num_pairs, num_folds):
    sizes = [len(part) for part in np.array_split(np.arange(num_pairs), num_folds)]
    return np.repeat(np.arange(num_folds), sizes)


@pytest.mark.parametrize("num_pairs,num_folds", [(203, 10), (96, 5)])
@pytest.mark.parametrize("distance,metric", [("angular", 1), ("squared", 0)])
@pytest.mark.parametrize("subtract_mean", [True, False])
@pytest.mark.parametrize("concat", [True, False])
def test_accuracy_equals_davidsandbergs_calculate_roc(num_pairs, num_folds, distance, metric,
                                                      subtract_mean, concat):
    labels, plain, mirror = offset_faces()
    # validate_on_lfw.py --use_flipped_images: [original | mirror], each half unit-norm.
    embeddings = np.concatenate([plain, mirror], axis=1) if concat else plain
    first, second, same = reused_pairs(labels, num_pairs)
    want = sandberg_fold_accuracies(embeddings[first], embeddings[second], same, num_folds,
                                    metric, subtract_mean)
    got = metrics.evaluate_embeddings(
        embeddings, labels, first, second, same, kfold_ids(num_pairs, num_folds),
        distance=distance, subtract_mean=subtract_mean, threshold_search="grid",
        include_identification=False)
    verification = metrics.verification_kfold(
        metrics.fold_distances(embeddings, first, second, kfold_ids(num_pairs, num_folds),
                               distance, subtract_mean=subtract_mean),
        same, kfold_ids(num_pairs, num_folds), threshold_search="grid")
    np.testing.assert_array_equal(verification["fold_accuracies"], want)
    assert got["accuracy"] == pytest.approx(np.mean(want), abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(np.std(want), abs=1e-12)


def test_the_port_comparison_can_fail_mean_and_search_both_matter():
    """On these embeddings each of davidsandberg's choices changes the accuracy, so the
    comparison above would catch a mean or a search that is not theirs."""
    labels, plain, _ = offset_faces()
    first, second, same = reused_pairs(labels, 203)
    folds = kfold_ids(203, 10)

    def accuracy(subtract_mean, search):
        return metrics.evaluate_embeddings(
            plain, labels, first, second, same, folds, distance="angular",
            subtract_mean=subtract_mean, threshold_search=search,
            include_identification=False)["accuracy"]

    assert accuracy(True, "grid") > accuracy(False, "grid") + 0.03  # the offset hurts angles
    assert accuracy(False, "grid") != accuracy(False, "exact")  # angular < 1: coarse grid
    # The pairs reuse images: the pair-weighted mean (theirs) is not the mean of the images.
    unique = np.unique(np.concatenate([first, second]))
    pair_mean = np.concatenate([plain[first], plain[second]]).mean(0)
    assert np.abs(pair_mean - plain[unique].mean(0)).max() > 1e-3


def test_angular_distance_hand_values():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    first, second = np.array([0, 0, 0, 0, 0]), np.array([0, 1, 2, 3, 4])
    np.testing.assert_allclose(metrics.pair_distances(emb, first, second, "angular"),
                               [0.0, 0.5, 1.0, 0.25, 0.5], atol=1e-7)
    # Retrieval ranks angular like cosine (a monotone map of it).
    labels = np.array([0, 0, 1, 1, 2])
    assert (metrics.retrieval_metrics(emb[:4], labels[:4], distance="angular")
            == metrics.retrieval_metrics(emb[:4], labels[:4], distance="cosine"))


def test_grid_search_accepts_strictly_below_the_first_best_grid_value():
    # Training folds: same at 0.105, different at 0.107: no grid value separates them; the
    # first best is t = 0 (accept nothing: 1 of 2 right, as every t up to 0.10 and from 0.11).
    # The held fold's same pair at 0.105: the exact search accepts it (threshold 0.105),
    # the grid rejects it.
    d = np.array([0.105, 0.107, 0.105, 0.5])
    same = np.array([True, False, True, False])
    folds = np.array([0, 0, 1, 1])
    exact = metrics.verification_kfold(d, same, folds)
    grid = metrics.verification_kfold(d, same, folds, threshold_search="grid")
    assert exact["fold_thresholds"][1] == 0.105 and exact["fold_accuracies"][1] == 1.0
    assert grid["fold_thresholds"][1] == np.nextafter(0.0, -1) and grid["fold_accuracies"][1] == 0.5
    # d < t is d <= the recorded threshold: a distance exactly on a grid value is rejected.
    d = np.array([0.2, 0.5, 0.3, 0.9])
    grid = metrics.verification_kfold(d, same, folds, threshold_search="grid")
    t = np.arange(0, 4, 0.01)[21]  # the first grid value above 0.2 (0.21)
    assert grid["fold_thresholds"][1] == np.nextafter(t, -1)
    with pytest.raises(ValueError, match="threshold_search 'coarse'"):
        metrics.verification_kfold(d, same, folds, threshold_search="coarse")


def test_subtract_mean_uses_the_training_folds_pair_embeddings():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])
    first, second = np.array([0, 0, 2]), np.array([1, 2, 3])
    folds = np.array([0, 0, 1])
    d = metrics.fold_distances(emb, first, second, folds, "squared", subtract_mean=True)
    assert d.shape == (2, 3)
    # Squared distances do not move with a common shift; the rows differ only in angle terms.
    np.testing.assert_allclose(d, np.tile(metrics.pair_distances(emb, first, second,
                                                                 "squared"), (2, 1)))
    a = metrics.fold_distances(emb, first, second, folds, "cosine", subtract_mean=True)
    mean_for_fold_0 = (emb[2] + emb[3]) / 2  # fold 1's one pair (images 2 and 3)
    mean_for_fold_1 = (emb[0] + emb[1] + emb[0] + emb[2]) / 4  # image 0 counted twice
    for row, mean in ((0, mean_for_fold_0), (1, mean_for_fold_1)):
        np.testing.assert_allclose(a[row], metrics.pair_distances(emb - mean, first, second,
                                                                  "cosine"))
    np.testing.assert_allclose(metrics.held_out_distances(a, folds),
                               [a[0, 0], a[0, 1], a[1, 2]])


def test_unbalanced_folds_are_reported_and_logged(caplog):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(24, 4))
    labels = np.arange(24)
    # Fold 2 (1-based) holds only same pairs, fold 3 only different ones.
    same = np.array([True, False] * 2 + [True] * 4 + [False] * 4)
    pairs = data.Pairs(first=np.arange(12), second=np.arange(12, 24), is_same=same,
                       fold=np.repeat(np.arange(3), 4))
    assert metrics.unbalanced_folds(same, pairs.fold) == [2, 3]
    with caplog.at_level(logging.WARNING):
        result = evaluate.evaluate_embedded(emb, labels, pairs, distance="squared",
                                            identification="none")
    assert result["unbalanced_folds"] == [2, 3]
    assert "folds [2, 3] hold only same or only different pairs" in caplog.text
    balanced = data.Pairs(pairs.first, pairs.second, np.tile([True, False], 6), pairs.fold)
    assert evaluate.evaluate_embedded(emb, labels, balanced, distance="squared",
                                      identification="none")["unbalanced_folds"] == []


def test_the_summary_names_the_protocol():
    labels, plain, _ = offset_faces()
    first, second, same = reused_pairs(labels, 40)
    pairs = data.Pairs(first, second, same, kfold_ids(40, 4))
    result = evaluate.evaluate_embedded(plain, labels, pairs, distance="angular",
                                        subtract_mean=True, threshold_search="grid")
    result.update({"flip": True, "flip_mode": "concat", "subtract_mean": True,
                   "threshold_search": "grid", "distance": "angular"})
    assert ("(4-fold, 40 pairs, angular distance, mirror concatenated, training folds' mean "
            "subtracted, 0.01 threshold grid): accuracy") in evaluate.format_summary(result)
    result.update({"flip": False, "subtract_mean": False, "threshold_search": "exact"})
    assert "(4-fold, 40 pairs, angular distance): accuracy" in evaluate.format_summary(result)


def test_a_fixed_threshold_refuses_subtract_mean():
    emb = np.eye(4)
    pairs = data.Pairs(np.array([0, 1]), np.array([1, 2]), np.array([True, False]),
                       np.array([0, 0]))
    with pytest.raises(ValueError, match="subtract_mean=True needs the k-fold protocol"):
        evaluate.evaluate_embedded(emb, np.arange(4), pairs, distance="squared",
                                   threshold=0.5, subtract_mean=True)


def _run_config():
    return config_lib.load_config(config_lib.pathlib.Path(__file__).resolve().parents[1]
                                  / "experiments" / "default.py")


def test_evaluation_overrides_are_typed_checked_and_limited_to_evaluation_keys():
    config = _run_config()
    changed = config_lib.apply_evaluation_overrides(config, {
        "eval.distance": "angular", "eval.flip": "True", "eval.flip_mode": "concat",
        "eval.subtract_mean": "true", "eval.threshold_search": "grid", "eval.batch_size": "32"})
    assert (changed.eval.distance, changed.eval.flip, changed.eval.flip_mode,
            changed.eval.subtract_mean, changed.eval.threshold_search,
            changed.eval.batch_size) == ("angular", True, "concat", True, "grid", 32)
    assert config.eval.distance == "squared"  # the run's own config is untouched
    with pytest.raises(ValueError, match=r"--config.loss.margin: an evaluation may change only"):
        config_lib.apply_evaluation_overrides(config, {"loss.margin": "0.3"})
    with pytest.raises(ValueError, match="give True or False"):
        config_lib.apply_evaluation_overrides(config, {"eval.subtract_mean": "yes"})
    # The values' meaning is the evaluation's to check (load_encoder runs both).
    with pytest.raises(ValueError, match="unknown eval.distance 'manhattan'"):
        validate_eval_config(
            config_lib.apply_evaluation_overrides(config, {"eval.distance": "manhattan"}).eval)
    with pytest.raises(ValueError, match="eval.flip_mode must be one of"):
        validate_eval_config(
            config_lib.apply_evaluation_overrides(config, {"eval.flip_mode": "mean"}).eval)
    with pytest.raises(ValueError, match="eval.batch_size must be a positive integer"):
        validate_eval_config(
            config_lib.apply_evaluation_overrides(config, {"eval.batch_size": "0"}).eval)
    assert config_lib.overrides_from_texts(["eval.flip", "eval.distance=angular"]) == {
        "eval.flip": "True", "eval.distance": "angular"}
    assert evaluate_cli.split_run_config_flags(
        ["prog", "--workdir", "W", "--config.eval.flip"]) == [
        "prog", "--workdir", "W", "--run_config=eval.flip"]
    with_file = ["prog", "--config", "f.py", "--config.eval.flip=True"]
    assert evaluate_cli.split_run_config_flags(with_file) == with_file


def test_angular_is_an_evaluation_distance_only():
    config = _run_config()
    config.eval.distance = "angular"
    validate_run_config(config, num_devices=1)
    config.loss.distance = "angular"
    with pytest.raises(ValueError, match="angular"):
        validate_run_config(config, num_devices=1)
    assert {"eval.distance", "eval.flip_mode", "eval.subtract_mean",
            "eval.threshold_search"} <= set(config_lib.EVALUATION_ONLY_KEYS)


def test_a_threshold_chosen_with_subtract_mean_is_not_the_runs(tmp_path):
    import json

    (tmp_path / "eval_validation.json").write_text(json.dumps({
        "threshold": 0.4, "distance": "angular", "split": "validation", "step": 5,
        "config": {"eval": {"subtract_mean": True}}}))
    with pytest.raises(ValueError, match="mean-subtracted embeddings"):
        run_threshold(tmp_path)


def test_evaluation_overrides_need_an_output_file(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--workdir", str(tmp_path),
         "--config.eval.distance=angular"], capture_output=True, text=True, timeout=120,
        cwd=config_lib.pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluates with another protocol than the run's: pass --output FILE" in (
        result.stderr.strip().splitlines()[-1])
