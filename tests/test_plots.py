"""Tests for facenet_jax.plots: figure contents against their inputs, PCA against sklearn, files."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.decomposition import PCA

from facenet_jax.eval import metrics, plots


def clustered(seed=0, identities=6, per_identity=5, dim=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    emb = rng.normal(size=(identities, dim))[labels] + 0.5 * rng.normal(size=(len(labels), dim))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def test_pca_2d_matches_sklearn():
    emb, _ = clustered()
    points, ratio = plots.pca_2d(emb)
    reference = PCA(n_components=2).fit(emb)
    want = reference.transform(emb)
    for column in range(2):  # principal axes are defined up to sign
        sign = np.sign(points[:, column] @ want[:, column])
        np.testing.assert_allclose(points[:, column], sign * want[:, column], atol=1e-10)
    np.testing.assert_allclose(ratio, reference.explained_variance_ratio_, rtol=1e-10)


def test_pca_2d_sign_convention_and_degenerate_inputs():
    # Points on the line y = −2x: one component, loading (1, −2)/√5 up to sign; its largest
    # loading (−2/√5) must come out positive, so x ↦ −√5·(x − mean) on PC 1.
    x = np.array([0.0, 1.0, 2.0, 3.0])
    points, ratio = plots.pca_2d(np.stack([x, -2 * x], axis=1))
    np.testing.assert_allclose(points[:, 0], -np.sqrt(5) * (x - 1.5), atol=1e-12)
    np.testing.assert_allclose(ratio, [1, 0], atol=1e-12)
    points, ratio = plots.pca_2d(np.ones((3, 4)))  # no variance at all
    np.testing.assert_array_equal(points, 0)
    np.testing.assert_array_equal(ratio, 0)
    with pytest.raises(ValueError, match="N ≥ 2, D ≥ 2"):
        plots.pca_2d(np.ones((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        plots.pca_2d(np.full((3, 2), np.nan))


def test_roc_figure_draws_the_curve_and_the_eer_point():
    d = np.array([0.1, 0.2, 0.3, 0.3, 0.5])
    same = np.array([1, 0, 1, 0, 1], bool)
    far, tar, _ = metrics.roc_curve(d, same)
    eer, _ = metrics.equal_error_rate(d, same)
    ax = plots.roc_figure(far, tar, label="run", auc=5 / 12, eer=eer).axes[0]
    curve, point = ax.lines[:2]
    np.testing.assert_array_equal(curve.get_xdata(), far)
    np.testing.assert_array_equal(curve.get_ydata(), tar)
    assert curve.get_label() == "run, AUC 0.4167, EER 0.6000"
    assert (point.get_xdata()[0], point.get_ydata()[0]) == (eer, pytest.approx(1 - eer))
    log_ax = plots.roc_figure(far, tar, log_far=True).axes[0]
    assert log_ax.get_xscale() == "log"
    np.testing.assert_array_equal(log_ax.lines[0].get_xdata(), far[far > 0])
    with pytest.raises(ValueError, match="one length"):
        plots.roc_figure(far, tar[:-1])


def test_roc_figure_marks_operating_points_on_a_log_far_axis():
    far, tar = np.array([0.0, 1e-5, 1e-3, 1.0]), np.array([0.0, 0.5, 0.9, 1.0])
    ax = plots.roc_figure(far, tar, log_far=True, far_min=1e-6,
                          points={"VAL@FAR=1e-3": (1e-3, 0.9)}).axes[0]
    assert ax.get_xlim()[0] == pytest.approx(1e-6)
    marker = ax.lines[1]
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (1e-3, 0.9)
    assert marker.get_label() == "VAL@FAR=1e-3: TAR 0.9000 at FAR 1.0e-03"


def test_an_unresolved_val_point_is_labelled_so_with_its_actual_far():
    """A VAL@FAR=1e-3 whose held-out FAR is 0.04 (chosen on too few different pairs) was
    labelled plainly "VAL@FAR=1e-3" on the ROC."""
    from facenet_jax.eval import evaluate

    result = {"far@far=1e-3": 0.04, "val@far=1e-3": 0.02, "val@far=1e-3_resolved": False,
              "far@far=1e-2": 0.04, "val@far=1e-2": 0.02, "val@far=1e-2_resolved": True}
    points = evaluate.val_operating_points(result)
    assert points == {"VAL@FAR=1e-3 (unresolved)": (0.04, 0.02), "VAL@FAR=1e-2": (0.04, 0.02)}
    far, tar = np.array([0.0, 0.04, 1.0]), np.array([0.0, 0.02, 1.0])
    labels = [line.get_label() for line in
              plots.roc_figure(far, tar, log_far=True, points=points).axes[0].lines[1:]]
    assert labels == ["VAL@FAR=1e-3 (unresolved): TAR 0.0200 at FAR 4.0e-02",
                      "VAL@FAR=1e-2: TAR 0.0200 at FAR 4.0e-02"]


def test_run_roc_is_log_far_with_the_val_points(tmp_path):
    from facenet_jax.eval import evaluate

    result = {"auc": 0.9, "eer": 0.1, "threshold": 0.5, "far@far=1e-3": 0.0,
              "val@far=1e-3": 0.4, "far@far=1e-2": 0.01, "val@far=1e-2": 0.8}
    assert evaluate.val_operating_points(result) == {"VAL@FAR=1e-2": (0.01, 0.8)}
    d = np.linspace(0, 1, 200)
    written = evaluate.write_evaluation(result, tmp_path / "eval.json", distances=d,
                                        is_same=np.arange(200) < 100)
    assert pathlib.Path(written["figures"]["roc"]).stat().st_size > 0


def test_distance_histogram_figure():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(0.6, 0.2, 70), rng.normal(1.6, 0.3, 130)])
    same = np.arange(200) < 70
    ax = plots.distance_histogram_figure(d, same, 1.05, title="t").axes[0]
    groups = ax.containers
    assert len(groups) == 2
    for bars in groups:  # densities: each group integrates to 1 over the shared bins
        area = sum(bar.get_height() * bar.get_width() for bar in bars)
        assert area == pytest.approx(1.0)
    same_counts = np.array([bar.get_height() * bar.get_width() for bar in groups[0]]) * 70
    edges = [bar.get_x() for bar in groups[0]] + [groups[0][-1].get_x() + groups[0][-1].get_width()]
    np.testing.assert_allclose(same_counts, np.histogram(d[same], bins=edges)[0], atol=1e-9)
    assert ax.lines[-1].get_xdata()[0] == 1.05
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "same identity (70 pairs)", "different identity (130 pairs)", "threshold 1.05"]
    assert ax.get_title() == "t"
    # A fold of only same pairs still draws (one group).
    assert len(plots.distance_histogram_figure(d[:70], same[:70], 1.0).axes[0].containers) == 1
    with pytest.raises(ValueError, match="NaN"):
        plots.distance_histogram_figure(np.array([np.nan, 1.0]), [True, False], 0.5)


def test_embedding_map_figure_plots_the_pca_coordinates():
    emb, labels = clustered()
    ax = plots.embedding_map_figure(emb, labels, names=[f"id{i}" for i in range(6)]).axes[0]
    points, _ = plots.pca_2d(emb)
    for identity, collection in enumerate(ax.collections):
        np.testing.assert_allclose(collection.get_offsets(), points[labels == identity])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"id{i}" for i in range(6)]
    many, many_labels = clustered(identities=21, per_identity=2)
    assert plots.embedding_map_figure(many, many_labels).axes[0].get_legend() is None
    with pytest.raises(ValueError, match="unknown method 'tsne'"):
        plots.embedding_map_figure(emb, labels, method="tsne")
    with pytest.raises(ValueError, match="labels"):
        plots.embedding_map_figure(emb, labels[:-1])


ROWS = [{"step": 10, "loss": 0.2, "active_fraction": 0.9},
        {"step": 20, "loss": None, "active_fraction": 0.5},  # non-finite, logged as null
        {"step": 30, "loss": 0.1, "active_fraction": 0.4},
        {"step": 30, "eval/accuracy": 0.75}]


def test_training_series_and_curves():
    steps, values = plots.training_series(ROWS, "loss")
    np.testing.assert_array_equal(steps, [10, 30])
    np.testing.assert_array_equal(values, [0.2, 0.1])
    fig = plots.training_curves_figure(ROWS + [{"step": 40, "loss": math.nan}])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "active_fraction", "eval/accuracy"]
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_ydata(), [0.9, 0.5, 0.4])
    with pytest.raises(ValueError, match=r"keys present: \['active_fraction', 'eval/acc"):
        plots.training_curves_figure(ROWS, keys=("grad_norm",))


def test_plot_functions_write_pngs(tmp_path):
    emb, labels = clustered()
    d = metrics.pair_distances(emb, np.arange(29), np.arange(1, 30), "squared")
    same = labels[:-1] == labels[1:]
    far, tar, _ = metrics.roc_curve(d, same)
    written = [
        plots.plot_roc(far, tar, tmp_path / "a" / "roc.png", auc=0.9, eer=0.1, log_far=True),
        plots.plot_distance_histogram(d, same, 0.5, str(tmp_path / "hist.png")),
        plots.plot_embedding_map(emb, labels, tmp_path / "map.png"),
        plots.plot_training_curves(ROWS, tmp_path / "curves.png"),
    ]
    for path, inches in zip(written, [(5, 4.5), (6, 4), (6.5, 5.5), (12, 3)]):
        assert isinstance(path, pathlib.Path) and path.is_file()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == tuple(round(110 * side) for side in inches)
            assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10  # not blank


def test_collapsed_embeddings_accept_nothing_and_still_write_their_figures(tmp_path):
    # Identical embeddings: every distance 0, accepting nothing ties accepting all and is the
    # smallest maximiser: threshold -inf (the 10-fold search's "accept nothing").
    from facenet_jax.eval import evaluate

    same = np.arange(40) % 2 == 0
    result = metrics.evaluate_embeddings(np.ones((80, 4)), np.arange(80), np.arange(40) * 2,
                                         np.arange(40) * 2 + 1, same, np.arange(40) // 4,
                                         include_identification=False)
    assert result["threshold"] == -np.inf and result["accuracy"] == 0.5
    ax = plots.distance_histogram_figure(np.zeros(40), same, result["threshold"]).axes[0]
    assert ax.lines[0].get_label() == "threshold -inf (accepts nothing)"
    written = evaluate.write_evaluation(result, tmp_path / "eval.json", distances=np.zeros(40),
                                        is_same=same)
    assert pathlib.Path(written["figures"]["histogram"]).stat().st_size > 0
    assert json.loads((tmp_path / "eval.json").read_text())["threshold"] is None
