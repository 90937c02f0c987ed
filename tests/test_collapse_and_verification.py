"""Issue 20's pure pieces: the shared collapse rule, the batch-hard warm-up keys, fixed-threshold
verification, the FAR resolution note, retrieval on the pairs' identities, the run's threshold,
figure titles and the exclusion of pairs-file people from validation."""

import json
import math

import ml_collections
import numpy as np
import pytest

from facenet_jax import collapse, config as cfg, data, runfiles, sweep
from facenet_jax.eval import evaluate, metrics
from facenet_jax.eval.threshold import run_threshold, threshold_warning
from facenet_jax.train import LossSpec
from facenet_jax.train.validate import validate_run_config, validate_warmup


def _rows(spreads, losses):
    return [{"step": 10 * (i + 1), "loss": loss, "embedding_spread": spread}
            for i, (spread, loss) in enumerate(zip(spreads, losses))]


def test_sweep_and_train_loop_share_one_collapse_rule():
    assert sweep.is_collapsed is collapse.is_collapsed


def test_collapse_warning_fires_only_when_the_rule_does_and_says_what_to_try():
    healthy = _rows([1.9, 1.8, 1.7], [0.10, 0.09, 0.08])
    assert collapse.collapse_warning(healthy, step=30, margin=0.2, distance="squared",
                                     soft=False) is None
    # Two collapsed rows are not yet the window of 3 (a sweep's is_collapsed judges them).
    assert collapse.collapse_warning(_rows([1.0, 0.005, 0.004], [0.1, 0.2, 0.2]), step=30,
                                     margin=0.2, distance="squared", soft=False) is None
    assert collapse.collapse_warning(_rows([0.005, 0.004], [0.2, 0.2]), step=20,
                                     margin=0.2, distance="squared", soft=False) is None
    text = collapse.collapse_warning(_rows([0.006, 0.005, 0.004], [0.19, 0.2, 0.2]), step=30,
                                     margin=0.2, distance="squared", soft=False)
    assert "collapsed by step 30" in text and "0.0040" in text and "below 0.02" in text
    assert "loss.warmup_strategy=semihard" in text
    # Soft margin: the loss pinned at ln 2 alone is enough.
    text = collapse.collapse_warning(_rows([0.5] * 3, [math.log(2)] * 3), step=9,
                                     margin=0.2, distance="euclidean", soft=True)
    assert text is not None and "ln 2" in text


def test_warmup_keys_default_off_and_a_warmup_is_another_run():
    config = cfg.load_config(cfg.__file__.replace("facenet_jax/config.py",
                                                  "experiments/default.py"))
    assert config.loss.warmup_steps == 0 and config.loss.warmup_strategy is None
    saved = cfg.to_plain(config)
    config.loss.warmup_strategy, config.loss.warmup_steps = "semihard", 100
    assert cfg.changed_keys(saved, cfg.to_plain(config)) == ["loss.warmup_steps",
                                                            "loss.warmup_strategy"]
    validate_run_config(config, num_devices=1)
    # A sweep cell started without the warm-up is stale once the sweep asks for one.
    current = {"config": cfg.to_plain(config)}
    assert sweep.record_changes({"config": saved}, current) == [
        "loss.warmup_steps was 0, now 100", "loss.warmup_strategy was None, now 'semihard'"]
    config.loss.warmup_strategy, config.loss.warmup_steps = None, 0
    assert sweep.record_changes({"config": saved}, {"config": cfg.to_plain(config)}) == []


@pytest.mark.parametrize("strategy, steps, match", [
    (None, 10, "needs loss.warmup_strategy"), ("nope", 10, "needs loss.warmup_strategy"),
    ("semihard", 0, "no effect"), ("semihard", -1, r"\[0, num_steps"),
    ("semihard", 5000, r"\[0, num_steps=1200\]")])
def test_bad_warmup_keys_are_clear_errors(strategy, steps, match):
    loss = ml_collections.ConfigDict({"warmup_strategy": strategy, "warmup_steps": steps})
    with pytest.raises(ValueError, match=match):
        validate_warmup(loss, 1200)


def test_warmup_loss_spec_uses_the_warmup_strategy_with_its_own_options():
    loss = ml_collections.ConfigDict({
        "strategy": "distance_weighted", "margin": 0.2, "distance": "squared", "soft": False,
        "options": {"cutoff": 0.6}, "warmup_strategy": "semihard", "warmup_steps": 5})
    main = LossSpec.from_config(loss)
    warm = LossSpec.from_config(loss, warmup=True)
    assert (main.strategy, main.options) == ("distance_weighted", (("cutoff", 0.6),))
    assert (warm.strategy, warm.options) == ("semihard", ())


def test_verification_at_threshold_by_hand():
    d = np.array([0.1, 0.4, 0.5, 0.9, 0.3])
    same = np.array([True, True, False, False, False])
    got = metrics.verification_at_threshold(d, same, 0.45)
    # accepted: 0.1 (same), 0.4 (same), 0.3 (different) → 4 of 5 right; TAR 2/2, FAR 1/3.
    assert got == {"accuracy": 0.8, "tar": 1.0, "far": pytest.approx(1 / 3), "threshold": 0.45,
                   "num_pairs": 5}
    with pytest.raises(ValueError, match="finite"):
        metrics.verification_at_threshold(d, same, float("nan"))


def test_far_resolution_counts_the_fewest_training_different_pairs():
    same = np.array([True, False, False, True, False, True, False, False])
    folds = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    # different pairs per fold: 2, 1, 2 → training folds hold 3, 4, 3.
    assert metrics.far_resolution(same, folds) == 3
    pairs = data.Pairs(np.zeros(8, int), np.ones(8, int), same, folds)
    emb = np.eye(2)
    result = evaluate.evaluate_embedded(emb, np.array([0, 1]), pairs, distance="squared",
                                        identification="none")
    assert result["val@far=1e-2_resolved"] is False and result["val@far=1e-3_resolved"] is False


def _clustered(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), 3)
    centres = rng.normal(size=(6, 8))
    emb = centres[labels] + 0.6 * rng.normal(size=(18, 8))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def test_identification_on_the_pairs_identities_is_the_subset_computation():
    emb, labels = _clustered()
    # Pairs over identities 0, 1 and 2 only (rows 0-8), 2 folds.
    first, second = np.array([0, 3, 0, 6, 1, 4, 2, 7]), np.array([1, 4, 3, 7, 2, 5, 8, 5])
    pairs = data.Pairs(first, second, labels[first] == labels[second],
                       np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    result = evaluate.evaluate_embedded(emb, labels, pairs, distance="squared",
                                        identification="pairs")
    assert result["identification_on"] == "the 9 images of the 3 identities in the pairs"
    subset = metrics.identification_metrics(emb[:9], labels[:9], distance="squared")
    whole = metrics.identification_metrics(emb, labels, distance="squared")
    assert {k: result[k] for k in subset} == subset and subset != whole
    everything = evaluate.evaluate_embedded(emb, labels, pairs, distance="squared")
    assert {k: everything[k] for k in whole} == whole


def test_fixed_threshold_evaluation_and_fold_selection():
    emb, labels = _clustered(1)
    first, second = np.array([0, 3, 0, 6, 1, 4, 2, 7]), np.array([1, 4, 3, 7, 2, 5, 8, 5])
    same = labels[first] == labels[second]
    pairs = data.Pairs(first, second, same, np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    second_fold = evaluate.select_fold(pairs, 2)
    np.testing.assert_array_equal(second_fold.first, [1, 4, 2, 7])
    with pytest.raises(ValueError, match=r"--fold 3: the pairs file has folds 1\.\.2"):
        evaluate.select_fold(pairs, 3)
    result = evaluate.evaluate_embedded(emb, labels, second_fold, distance="squared",
                                        threshold=0.7, identification="none")
    d = ((emb[second_fold.first] - emb[second_fold.second]) ** 2).sum(1)
    assert result["accuracy"] == pytest.approx(np.mean((d <= 0.7) == second_fold.is_same))
    assert result["num_folds"] == 1 and result["threshold"] == 0.7
    assert "val@far=1e-3" not in result


def test_run_threshold_prefers_validation_and_says_where_it_came_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="--threshold T"):
        run_threshold(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps(
        {"threshold": 0.9, "distance": "squared", "split": "test", "step": 8}))
    assert run_threshold(tmp_path)["split"] == "test"
    (tmp_path / "eval_validation.json").write_text(json.dumps(
        {"threshold": 0.7, "distance": "squared", "split": "validation", "step": 8}))
    chosen = run_threshold(tmp_path)
    assert (chosen["threshold"], chosen["split"], chosen["step"]) == (0.7, "validation", 8)


def test_figure_title_names_run_data_split_step_and_distance(tmp_path):
    result = {"config": {"data": {"source": "folder", "root": "/d/extended_yaleb"}},
              "split": "test", "step": 800, "distance": "squared"}
    assert (evaluate.figure_title(result, tmp_path / "run7" / "eval.json")
            == "run7 · extended_yaleb, test split · step 800 · squared")
    result = {"config": {"data": {"source": "folder"}}, "data_root": "/d/lfw_half",
              "pairs": "/d/lfw_half_pairs.txt", "fold": 2, "step": 5, "distance": "euclidean"}
    assert (evaluate.figure_title(result, tmp_path / "run7" / "eval_lfw.json")
            == "run7 · lfw_half, lfw_half_pairs.txt, fold 2 · step 5 · euclidean")


def test_summary_of_an_accept_nothing_threshold_read_back_from_json():
    # Collapsed embeddings: every distance 0, so accepting nothing ties the best accuracy and
    # the k-fold threshold is -inf, which the JSON holds as null.
    labels = np.repeat(np.arange(4), 2)
    pairs = data.Pairs(np.array([0, 2, 4, 6, 0, 2, 4, 6]), np.array([1, 3, 5, 7, 2, 4, 6, 0]),
                       np.array([True] * 4 + [False] * 4), np.array([0, 1] * 4))
    result = {**evaluate.evaluate_embedded(np.tile([[1.0, 0.0, 0.0]], (8, 1)), labels, pairs,
                                           distance="squared"), "distance": "squared"}
    assert result["threshold"] == -np.inf
    saved = json.loads(json.dumps(cfg.json_safe(result)))
    assert saved["threshold"] is None
    for summary in (evaluate.format_summary(result), evaluate.format_summary(saved)):
        assert "threshold -inf (accepts nothing)" in summary


def test_threshold_flag_accepts_numbers_and_run_only():
    assert evaluate.threshold_flag("0.5") == 0.5
    assert evaluate.threshold_flag("run") == "run"
    assert evaluate.threshold_flag(None) is None
    for bad in ("abc", "nan", "inf"):
        with pytest.raises(ValueError, match="--threshold"):
            evaluate.threshold_flag(bad)


def test_lfw_config_finds_the_shared_lfw_half_folder(shared_data):
    config = cfg.load_config(cfg.__file__.replace("facenet_jax/config.py", "experiments/lfw.py"))
    assert config.data.root == str(shared_data / "lfw_half")


# ----------------------------------------------------------------------------------------------
# How solid a threshold is; where the pixel baseline writes (issue 29).


def test_pair_counts_say_what_a_threshold_rests_on():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pairs = data.Pairs(np.array([0, 2, 0, 4, 1, 2]), np.array([1, 3, 2, 6, 5, 4]),
                       np.array([True, True, False, False, False, False]),
                       np.array([0, 0, 0, 1, 1, 1]))
    # identities among the paired images: 0, 1, 2, 3 (row 6 is identity 3); 4 different pairs
    assert metrics.pair_counts(labels, pairs.first, pairs.second, pairs.is_same) == {
        "num_pair_identities": 4, "num_different_pairs": 4}
    emb = np.eye(8)
    result = evaluate.evaluate_embedded(emb, labels, pairs, distance="squared",
                                        identification="none")
    assert (result["num_pair_identities"], result["num_different_pairs"]) == (4, 4)


def _validation_file(workdir, **counts):
    (workdir / "eval_validation.json").write_text(json.dumps(
        {"threshold": 0.7, "distance": "squared", "split": "validation", "step": 8,
         "num_pairs": 2 * counts.get("num_different_pairs", 0), **counts}))


def test_threshold_info_says_what_it_was_chosen_on_and_warns_when_thin(tmp_path, caplog):
    """An ORL run's threshold came from 4 people, without a word."""
    from facenet_jax.eval.embed import Encoder

    _validation_file(tmp_path, num_pair_identities=4, num_different_pairs=30)
    encoder = Encoder(config=None, variables=None, step=8, embedder=None, workdir=tmp_path)
    with caplog.at_level("WARNING"):
        info = encoder.threshold_info
    assert (info["num_identities"], info["num_pairs"], info["num_different_pairs"]) == (4, 60, 30)
    assert ("4 identities (fewer than 20) and 30 different pairs (fewer than 200)"
            in info["warning"]) and info["warning"] in caplog.text
    _validation_file(tmp_path, num_pair_identities=20, num_different_pairs=199)
    assert "199 different pairs" in run_threshold(tmp_path)["warning"]
    assert "identities" not in run_threshold(tmp_path)["warning"]
    _validation_file(tmp_path, num_pair_identities=20, num_different_pairs=200)
    assert run_threshold(tmp_path)["warning"] is None
    # a file that does not record the counts: nothing to judge
    (tmp_path / "eval_validation.json").write_text(json.dumps(
        {"threshold": 0.7, "distance": "squared", "split": "validation", "step": 8}))
    info = run_threshold(tmp_path)
    assert info["num_identities"] is None and info["warning"] is None
    summary = evaluate.format_summary({
        "threshold": 0.7, "threshold_source": "the run's validation split", "num_pairs": 4,
        "accuracy": 0.5, "tar": 0.5, "far": 0.5, "auc": 0.5, "eer": 0.5,
        "threshold_warning": threshold_warning(4, 30)})
    assert summary.splitlines()[-1].startswith("warning: the threshold was chosen on 4 ")


def test_pixel_baseline_writes_under_the_run_or_an_explicit_path_never_the_cwd(tmp_path):
    """`evaluate --baseline pixels` without --output wrote its JSON and figures into the
    current directory."""
    config = cfg.load_config(cfg.__file__.replace("facenet_jax/config.py",
                                                  "experiments/default.py"))
    with pytest.raises(ValueError, match="give --output FILE"):
        evaluate.baseline_inputs("pixels", config, None, None)
    with pytest.raises(ValueError, match="not neither"):
        evaluate.baseline_inputs("pixels", None, None, None)
    with pytest.raises(ValueError, match="not both"):
        evaluate.baseline_inputs("pixels", config, str(tmp_path), None)
    chosen, output = evaluate.baseline_inputs("pixels", config, None, str(tmp_path / "p.json"))
    assert chosen is config and output == tmp_path / "p.json"
    run = tmp_path / "run"
    run.mkdir()
    runfiles.write_config(run, config)
    chosen, output = evaluate.baseline_inputs("pixels", None, str(run), None)
    assert output == run / "eval_pixels.json" and cfg.to_plain(chosen) == cfg.to_plain(config)
    # Never over the run's own evaluation (which sweeps read).
    (run / "eval.json").write_text(json.dumps({"split": "test", "accuracy": 0.9}))
    with pytest.raises(FileExistsError, match="holds the evaluation of the run's test split"):
        evaluate.check_output_holds_the_same_evaluation(run / "eval.json", None, None,
                                                         baseline="pixels")
    (run / "eval_pixels.json").write_text(json.dumps({"split": "test", "baseline": "pixels"}))
    evaluate.check_output_holds_the_same_evaluation(run / "eval_pixels.json", None, None,
                                                     baseline="pixels")  # re-scored in place
    with pytest.raises(FileExistsError, match="pixels baseline"):
        evaluate.check_output_holds_the_same_evaluation(run / "eval_pixels.json", None, None)


def test_pixel_baseline_cli_without_output_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from test_train_cli import REPO, _env

    result = subprocess.run(
        [sys.executable, "-m", "facenet_jax.evaluate", "--baseline", "pixels", "--config",
         str(REPO / "experiments" / "default.py")],
        cwd=tmp_path, env=_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2 and "give --output FILE" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_orls_validation_threshold_is_warned_as_thin(shared_data):
    """The issue's case: experiments/orl.py chooses its threshold on 4 validation people."""
    config = cfg.load_config(cfg.__file__.replace("facenet_jax/config.py",
                                                  "experiments/orl.py"))
    validation, pairs = evaluate.split_and_pairs(config, split="validation")
    result = evaluate.evaluate_embedded(evaluate.pixel_embeddings(np.asarray(validation.images)),
                                        validation.labels, pairs, distance="squared",
                                        identification="none")
    assert result["num_pair_identities"] == 4 == validation.num_identities
    assert result["num_different_pairs"] == int(np.sum(~pairs.is_same))
    warning = threshold_warning(result["num_pair_identities"],
                                         result["num_different_pairs"])
    assert "4 identities (fewer than 20)" in warning
