"""IJB-B/C 1:1 template verification on a tiny layout built from synthetic faces, checked
against explicit loops (template features, scores) and enumerated thresholds / sklearn's ROC
(TAR@FAR, as insightface reads it)."""

import json
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from facenet_jax.eval import ijb
from facenet_jax.data.alignment import align_by_landmarks
from facenet_jax.data.folder import resize_array
from facenet_jax.eval.evaluate import pixel_embeddings

from benchmark_fixtures import FACE, write_ijb_layout

MODEL = 16


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_ijb_layout(tmp_path_factory.mktemp("IJB"))


def test_alignment_by_the_given_landmarks_recovers_the_face(layout):
    root, faces, _, landmarks, _, _ = layout
    inner = (slice(None), slice(6, -6), slice(6, -6))  # away from the border's interpolation
    originals = faces.images[inner].astype(float)
    for i in range(0, len(landmarks), 10):
        aligned = ijb.aligned_face(root / "loose_crop" / f"{i + 1}.png", landmarks[i], FACE)
        error = np.abs(originals - aligned[None][inner]).mean(axis=(1, 2, 3))
        # Its own face, clearly (two bilinear resamplings leave ~10 grey levels of error).
        assert np.argmin(error) == i and error[i] < 0.6 * np.sort(error)[1]
        shifted = ijb.aligned_face(root / "loose_crop" / f"{i + 1}.png", landmarks[i] + 4, FACE)
        assert np.abs(originals[i] - shifted[inner[1:]]).mean() > 1.5 * error[i]


def _brute_force(layout, use_detector_score):
    """Template features and pair scores by explicit loops, images aligned one at a time."""
    root, _, media_rows, landmarks, scores, pairs = layout
    features = {}
    for i, (name, template, media) in enumerate(media_rows):
        face = align_by_landmarks(np.asarray(Image.open(root / "loose_crop" / name)),
                                  landmarks[i], 112)
        feature = pixel_embeddings(resize_array(face, MODEL)[None])[0].astype(np.float64)
        weight = scores[i] if use_detector_score else 1.0
        features.setdefault(template, {}).setdefault(media, []).append(weight * feature)
    template_features = {}
    for template, medias in features.items():
        total = sum(np.mean(members, axis=0) for members in medias.values())
        template_features[template] = total / np.linalg.norm(total)
    pair_scores = np.array([template_features[a] @ template_features[b] for a, b, _ in pairs])
    return template_features, pair_scores


@pytest.mark.parametrize("use_detector_score", [True, False])
def test_template_features_and_scores_match_explicit_loops(layout, use_detector_score, caplog):
    caplog.set_level(logging.INFO)
    root = layout[0]
    meta = ijb.read_meta(root, "IJBC")
    features = ijb.image_features(pixel_embeddings, root, meta, image_size=MODEL, chunk_size=50)
    ids, feats = ijb.template_features(features, meta.templates, meta.medias,
                                       meta.scores if use_detector_score else None)
    expected, expected_scores = _brute_force(layout, use_detector_score)
    assert ids.tolist() == sorted(expected)
    for template, feature in zip(ids, feats):
        np.testing.assert_allclose(feature, expected[template], atol=1e-5)
    scores = ijb.pair_scores(ids, feats, meta.pair_templates, chunk_size=37)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert "template pairs (chunks): 8/8" in caplog.text  # progress outside a terminal


def _brute_force_tar(scores, same, target):
    """Conservative rule: try every score as an 'accept ≥ t' threshold (and accept nothing)."""
    best = (0.0, 0.0)
    for t in [np.inf] + sorted(set(scores.tolist())):
        far = np.mean(scores[~same] >= t)
        if far <= target:
            best = max(best, (np.mean(scores[same] >= t), -far))
    return best[0]


def insightface_tar_at_far(same, scores, target):
    """A port of insightface's eval_ijbc.py reading: sklearn's ROC (its default points), fpr
    and tpr flipped, then the first point with the FAR nearest the target."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(same, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)  # "select largest tpr at same fpr"
    _, min_index = min(zip(abs(fpr - target), range(len(fpr))))
    return tpr[min_index]


def test_equally_near_roc_points_read_the_highest_tar_as_insightface():
    scores = np.array([.95, .90, .85, .30, .20, .10, 0, -.1, -.2, -.3])
    same = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    # FAR 1/8 is the nearest to 0.1, at TAR 0.5 (accept ≥ .90) and TAR 1.0 (accept ≥ .85).
    assert insightface_tar_at_far(same, scores, 0.1) == 1.0
    assert ijb.tar_at_far(scores, same, (0.1,))["tar@far"]["1e-1"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_tar_at_far_matches_enumeration_and_sklearn_reading(seed):
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    same = rng.random(3000) < 0.2
    scores = np.round(rng.normal(same * 1.5, 1.0), 2)  # rounded: many tied scores
    targets = (1e-3, 1e-2, 1e-1, 0.3)
    result = ijb.tar_at_far(scores, same, targets)
    for target in targets:
        key = ijb.far_name(target)
        assert result["tar@far"][key] == insightface_tar_at_far(same, scores, target)
        conservative = result["tar@far_conservative"][key]
        assert conservative["tar"] == pytest.approx(_brute_force_tar(scores, same, target))
        assert conservative["far"] <= target
        accepted = scores >= conservative["score_threshold"]
        assert np.mean(accepted[~same]) == pytest.approx(conservative["far"])
        assert np.mean(accepted[same]) == pytest.approx(conservative["tar"])
    full_fpr, full_tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    assert result["auc"] == pytest.approx(np.trapezoid(full_tpr, full_fpr))


def test_untied_scores_read_like_insightface_and_the_dropped_points_matter():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(4)
    same = rng.random(20000) < 0.1
    scores = rng.normal(same * 2.0, 1.0)
    result = ijb.tar_at_far(scores, same, ijb.FAR_TARGETS)
    for target in ijb.FAR_TARGETS:
        assert (result["tar@far"][ijb.far_name(target)]
                == insightface_tar_at_far(same, scores, target))
    # On every point of the curve the nearest one at FAR = 1e-2 is another (found here): the
    # reading depends on sklearn's dropping, which insightface's numbers include.
    full_fpr, full_tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    full_fpr, full_tpr = np.flipud(full_fpr), np.flipud(full_tpr)
    assert result["tar@far"]["1e-2"] != full_tpr[np.argmin(np.abs(full_fpr - 1e-2))]


def test_evaluate_and_write_on_the_layout(layout, tmp_path):
    root, *_, pairs = layout
    result = ijb.evaluate_ijb(pixel_embeddings, root, "IJBC", image_size=MODEL)
    _, expected_scores = _brute_force(layout, True)
    same = np.array([label for *_, label in pairs], bool)
    for target in ijb.FAR_TARGETS:
        conservative = result["tar@far_conservative"][ijb.far_name(target)]["tar"]
        assert conservative == pytest.approx(_brute_force_tar(expected_scores, same, target))
    written = ijb.write_ijb(result, tmp_path / "eval_ijbc.json")
    saved = json.loads((tmp_path / "eval_ijbc.json").read_text())
    assert saved["num_pairs"] == 276 and saved["num_templates"] == 24
    assert saved["features"]["feature_norm_weighting"].startswith("not applicable")
    assert "far" not in saved and (tmp_path / "eval_ijbc_roc.png").stat().st_size > 0
    assert written["figures"]["roc"].endswith("eval_ijbc_roc.png")
    assert "1e-4" in ijb.format_ijb_summary(saved)


def test_missing_or_misnamed_meta_files_are_named(layout, tmp_path):
    root = layout[0]
    with pytest.raises(FileNotFoundError, match=r"ijbb_face_tid_mid\.txt.*meta/ holds "
                                                r"\['ijbc_face_tid_mid\.txt"):
        ijb.read_meta(root, "IJBB")  # the IJB-C files, asked for as IJB-B
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing .*ijbc_name_5pts_score\.txt, .*"
                                                r"ijbc_template_pair_label\.txt, .*loose_crop"):
        ijb.read_meta(tmp_path, "IJBC")
    with pytest.raises(ValueError, match="unknown IJB set 'IJBA'"):
        ijb.meta_files(tmp_path, "IJBA")


def test_scoring_benchmark_runs_at_a_tiny_size(tmp_path):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks import ijb_scoring

    result = ijb_scoring.main(["--images", "300", "--templates", "20", "--pairs", "500",
                               "--dim", "8", "--output", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["pairs"] == 500
    assert result["pair_scores_s"] >= 0


def test_ijb_cli_path_writes_to_output_when_given(monkeypatch, tmp_path):
    """--output is taken by a benchmark run alone (it was refused for every benchmark)."""
    import types

    from facenet_jax.eval import evaluators, ijb

    written = []
    summary = {"ijb_name": "IJBC", "num_pairs": 1, "tar@far": {"1e-4": 0.5},
               "tar@far_conservative": {"1e-4": {"tar": 0.4, "far": 1e-4}}}
    monkeypatch.setattr(ijb, "evaluate_workdir_ijb",
                        lambda *args, output, **kwargs: written.append(output) or summary)
    flags = types.SimpleNamespace(workdir=str(tmp_path), ijb="ROOT", ijb_name="IJBC",
                                  ijb_detector_score=True, output=None, flip=None,
                                  run_config=None)
    run = evaluators.EVALUATORS.get("ijb").run_flags
    assert run(flags).endswith(f"wrote {tmp_path / 'eval_ijbc.json'}")
    flags.output = str(tmp_path / "mine.json")
    assert run(flags).endswith(f"wrote {tmp_path / 'mine.json'}")
    assert written == [tmp_path / "eval_ijbc.json", tmp_path / "mine.json"]
