"""The notebooks and what they call (`facenet_jax.explore`).

explore is checked against independent references: the loss recomputed in numpy from the mined
triplets, brute-force rules and gradients, hand cases; the notebooks are executed top to bottom
(parameter SMALL = True) in a fresh kernel, and the committed files must carry no outputs.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import jax
import nbformat
import numpy as np
import pytest
from matplotlib.figure import Figure
from tiny import cli_env

from tiers import slow_beyond_first
from facenet_jax import explore, losses
from facenet_jax.eval import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Figures each notebook must show: 4 kinds x 2 batches; curves, 2 ROC, histogram, 2 maps, one-shot;
# ROC, histogram, nearest neighbours, verify.
NOTEBOOKS = {"mining_strategies": 4 * 2, "train_and_evaluate": 1 + 3 + 2 + 1,
             "reproduce_facenet": 1 + 1 + 1 + 1}
B_P, B_K, DIM = 6, 4, 8  # one batch shape for the explore tests: each jitted function compiles once


def numpy_distances(emb: np.ndarray, distance: str) -> np.ndarray:
    """Independent float64 reference of the three distance kinds."""
    e = emb.astype(np.float64)
    squared = np.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1)
    if distance == "squared":
        return squared
    if distance == "euclidean":
        return np.sqrt(squared)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    return 1.0 - unit @ unit.T


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """P×K unit vectors, a little clustered by identity so every strategy has a mix of easy,
    semi-hard and hard triplets."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(B_P, dtype=np.int32), B_K)
    centres = rng.standard_normal((B_P, DIM))
    x = centres[labels] * 0.6 + rng.standard_normal((B_P * B_K, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


# ----------------------------------------------------------------------------------------------
# mined_triplets: the loss recomputed from the triplets, and the rules brute-forced.


def loss_from_triplets(emb: np.ndarray, triplets: explore.MinedTriplets, margin: float,
                       strategy: str, distance: str) -> float:
    d = numpy_distances(emb, distance)
    hinge = np.maximum(d[triplets.anchor, triplets.positive] + margin
                       - d[triplets.anchor, triplets.negative], 0.0)
    terms = hinge[hinge > 0] if strategy == "all" else hinge  # batch-all: mean over active
    return float(terms.mean()) if terms.size else 0.0


@pytest.mark.parametrize("distance", slow_beyond_first(losses.DISTANCES))
@pytest.mark.parametrize("strategy", losses.STRATEGIES)
def test_mined_triplets_reproduce_the_loss(batch, strategy, distance):
    emb, labels = batch
    margin = {"squared": 0.3, "euclidean": 0.2, "cosine": 0.15}[distance]
    triplets = explore.mined_triplets(emb, labels, margin=margin, strategy=strategy,
                                      distance=distance, seed=5)
    loss, stats = losses.triplet_loss(emb, labels, margin=margin, strategy=strategy,
                                      distance=distance, key=jax.random.key(5))
    assert len(triplets.anchor) == stats["num_triplets"] > 0
    assert triplets.active.sum() == stats["num_active"] > 0
    np.testing.assert_allclose(loss, loss_from_triplets(emb, triplets, margin, strategy,
                                                        distance), rtol=1e-4, atol=1e-6)
    # Every triplet is valid: same identity for the positive, another for the negative.
    assert np.all(labels[triplets.anchor] == labels[triplets.positive])
    assert np.all(triplets.anchor != triplets.positive)
    assert np.all(labels[triplets.anchor] != labels[triplets.negative])


def test_mined_triplets_follow_the_rules_brute_force(batch):
    emb, labels = batch
    margin = 0.3
    d = numpy_distances(emb, "squared")
    same = labels[:, None] == labels[None, :]
    semihard = explore.mined_triplets(emb, labels, margin=margin, strategy="semihard")
    for a, p, n in zip(semihard.anchor, semihard.positive, semihard.negative):
        farther = [j for j in np.flatnonzero(~same[a]) if d[a, j] > d[a, p]]
        want = (min(farther, key=lambda j: d[a, j]) if farther
                else max(np.flatnonzero(~same[a]), key=lambda j: d[a, j]))
        assert d[a, n] == pytest.approx(d[a, want], abs=1e-5)
    band = explore.mined_triplets(emb, labels, margin=margin, strategy="semihard_facenet", seed=1)
    ap, an = d[band.anchor, band.positive], d[band.anchor, band.negative]
    assert np.all((an > ap - 1e-6) & (an < ap + margin + 1e-6))
    hardest = explore.mined_triplets(emb, labels, margin=margin, strategy="hardest")
    np.testing.assert_array_equal(hardest.anchor, np.arange(len(labels)))
    for a, p, n in zip(hardest.anchor, hardest.positive, hardest.negative):
        assert d[a, p] == pytest.approx(d[a][same[a] & (np.arange(len(d)) != a)].max(), abs=1e-5)
        assert d[a, n] == pytest.approx(d[a][~same[a]].min(), abs=1e-5)
    every = explore.mined_triplets(emb, labels, margin=margin, strategy="all")
    assert len(every.anchor) == B_P * B_K * (B_K - 1) * (B_P - 1) * B_K


def test_mined_triplets_degenerate_and_bad_input(batch):
    emb, labels = batch
    distinct = np.arange(len(labels), dtype=np.int32)
    for strategy in losses.STRATEGIES:
        none = explore.mined_triplets(emb, distinct, margin=0.2, strategy=strategy)
        assert len(none.anchor) == 0
    with pytest.raises(ValueError, match="unknown strategy"):
        explore.mined_triplets(emb, labels, margin=0.2, strategy="semi-hard")
    with pytest.raises(ValueError, match="labels"):
        explore.mined_triplets(emb, labels[:-1], margin=0.2, strategy="hardest")
    with pytest.raises(ValueError, match="NaN"):
        explore.mined_triplets(np.full_like(emb, np.nan), labels, margin=0.2, strategy="all")
    with pytest.raises(ValueError, match="O\\(B³\\)"):
        explore.triplet_gaps(np.zeros((explore.MAX_LISTED_BATCH + 1, 2)),
                             np.zeros(explore.MAX_LISTED_BATCH + 1, dtype=int))


# ----------------------------------------------------------------------------------------------
# Distances, gaps, margin response.


def test_pair_distance_sets_and_gaps_brute_force(batch):
    emb, labels = batch
    d = numpy_distances(emb, "euclidean")
    d_ap, d_an = explore.pair_distance_sets(emb, labels, distance="euclidean")
    n = len(labels)
    want_ap = [d[a, p] for a in range(n) for p in range(n) if p != a and labels[p] == labels[a]]
    want_an = [d[a, j] for a in range(n) for j in range(n) if labels[j] != labels[a]]
    np.testing.assert_allclose(np.sort(d_ap), np.sort(want_ap), atol=2e-5)
    np.testing.assert_allclose(np.sort(d_an), np.sort(want_an), atol=2e-5)
    gaps = explore.triplet_gaps(emb, labels, distance="euclidean")
    want = [d[a, j] - d[a, p] for a in range(n) for p in range(n) for j in range(n)
            if p != a and labels[p] == labels[a] and labels[j] != labels[a]]
    np.testing.assert_allclose(np.sort(gaps), np.sort(want), atol=4e-5)


def test_gap_fractions_hand_case():
    fractions = explore.gap_fractions(np.array([-0.1, 0.0, 0.1, 0.2, 0.5]), margin=0.2)
    assert fractions == pytest.approx({"hard": 0.2, "semihard": 0.4, "easy": 0.4})
    assert explore.gap_fractions(np.array([]), 0.2) == {"hard": 0.0, "semihard": 0.0,
                                                        "easy": 0.0}


def hinge_gradient_squared(emb: np.ndarray, triplets: explore.MinedTriplets, margin: float,
                           strategy: str) -> np.ndarray:
    """Analytic gradient of the mean hinge on squared distances over the mined terms:
    ∂|x - y|²/∂x = 2(x - y)."""
    e = emb.astype(np.float64)
    d = numpy_distances(emb, "squared")
    a, p, n = triplets.anchor, triplets.positive, triplets.negative
    active = d[a, p] + margin - d[a, n] > 0
    count = active.sum() if strategy == "all" else len(a)
    grad = np.zeros_like(e)
    for i, j, k in zip(a[active], p[active], n[active]):
        grad[i] += 2 * (e[i] - e[j]) - 2 * (e[i] - e[k])
        grad[j] -= 2 * (e[i] - e[j])
        grad[k] += 2 * (e[i] - e[k])
    return grad / max(count, 1)


@pytest.mark.parametrize("strategy", [  # semi-hard's program compiles longest
    pytest.param(name, marks=pytest.mark.slow if name == "semihard" else ())
    for name in losses.STRATEGIES])
def test_margin_response_against_loss_and_analytic_gradient(batch, strategy):
    emb, labels = batch
    margins = [0.1, 0.4, 1.0]
    response = explore.margin_response(emb, labels, margins, strategy=strategy, seed=2)
    assert set(response) == {"loss", "grad_norm", "grad_finite", *losses.STATS_KEYS}
    assert all(v.shape == (3,) for v in response.values())
    for i, margin in enumerate(margins):
        loss, stats = losses.triplet_loss(emb, labels, margin=margin, strategy=strategy,
                                          key=jax.random.key(2))
        np.testing.assert_allclose(response["loss"][i], loss, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(response["active_fraction"][i], stats["active_fraction"])
        triplets = explore.mined_triplets(emb, labels, margin=margin, strategy=strategy, seed=2)
        want = np.linalg.norm(hinge_gradient_squared(emb, triplets, margin, strategy))
        np.testing.assert_allclose(response["grad_norm"][i], want, rtol=1e-4, atol=1e-6)
    assert response["grad_finite"].all()
    # A larger margin never makes fewer triplets active (same triplets for fixed-rule miners).
    if strategy in ("semihard", "hardest", "all", "random"):
        assert np.all(np.diff(response["num_active"]) >= 0)


def test_degenerate_batches_and_report(batch):
    emb, labels = batch
    cases = explore.degenerate_batches(emb, labels)
    assert tuple(cases) == explore.DEGENERATE_CASES
    assert all(e.shape == emb.shape and l.shape == labels.shape for e, l in cases.values())
    duplicates = cases["duplicates (K copies of one image)"][0]
    assert np.all(numpy_distances(duplicates, "squared")[labels[:, None] == labels] < 1e-12)
    margin = 0.2
    rows = {(r["batch"], r["strategy"]): r
            for r in explore.degenerate_report(emb, labels, margin=margin)}
    assert len(rows) == len(explore.DEGENERATE_CASES) * len(losses.STRATEGIES)
    for (case, strategy), row in rows.items():
        assert row["grad_finite"] and np.isfinite(row["loss"]), (case, strategy)
        if case in ("no positive pair", "one identity (no negative)"):
            assert row["num_triplets"] == 0 and row["loss"] == 0 and row["grad_norm"] == 0
        if case == "collapsed (all equal)":
            assert row["embedding_spread"] == 0
            if strategy != "semihard_facenet":  # its band (0, α) is empty: no term
                assert row["loss"] == pytest.approx(margin)
    table = explore.stats_table(list(rows.values()), explore.DEGENERATE_COLUMNS)
    assert len(table.splitlines()) == 2 + len(rows)


# ----------------------------------------------------------------------------------------------
# Set-up helpers, one-shot predictions, figures.


def test_random_unit_batch_and_default_config():
    emb, labels = explore.random_unit_batch(3, 2, 5, seed=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="≥ 1"):
        explore.random_unit_batch(0, 2, 5, seed=0)
    config = explore.default_config({"num_steps": 7})
    assert config.num_steps == 7 and config.loss.strategy == "semihard"


def test_oneshot_predictions_match_metrics_and_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=40)
    emb = rng.standard_normal((40, 6)).astype(np.float32)
    emb[5] = emb[6]  # a distance tie somewhere never hurts
    result = explore.oneshot_predictions(emb, labels, distance="euclidean", seed=4)
    np.testing.assert_array_equal(result.gallery, metrics.enrolment_indices(labels, 4))
    d = numpy_distances(emb, "euclidean")
    for probe, predicted in zip(result.probes, result.predicted):
        nearest = result.gallery[np.argmin(d[probe, result.gallery])]
        assert predicted == labels[nearest]
    reference = metrics.oneshot_identification(emb, labels, distance="euclidean", seed=4)
    assert result.hit.mean() == pytest.approx(reference["oneshot_top1"])
    assert len(result.probes) == reference["num_probes"]


def test_nearest_neighbours_brute_force_and_bad_input():
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((12, 4)).astype(np.float32)
    emb[7] = emb[3]  # a duplicate of a query: distance 0, found first
    emb[9] = emb[8]  # equally near every query: the lower index first
    queries = [3, 0, 11]
    neighbours, distances = explore.nearest_neighbours(emb, queries, k=4, distance="euclidean")
    d = numpy_distances(emb, "euclidean")
    for row, query in enumerate(queries):
        others = sorted((j for j in range(12) if j != query), key=lambda j: (d[query, j], j))
        np.testing.assert_array_equal(neighbours[row], others[:4])
        np.testing.assert_allclose(distances[row], d[query, others[:4]], atol=2e-5)
    assert neighbours[0, 0] == 7
    assert not np.any(neighbours == np.asarray(queries)[:, None])
    for bad, match in (({"queries": [12]}, "row indices"), ({"k": 12}, "k must be"),
                       ({"k": 0}, "k must be")):
        with pytest.raises(ValueError, match=match):
            explore.nearest_neighbours(emb, **{"queries": [0], "k": 2, **bad})
    with pytest.raises(ValueError, match="finite"):
        explore.nearest_neighbours(np.full_like(emb, np.nan), [0])


def test_figures(batch):
    emb, labels = batch
    anchors = [0, B_K]
    fig = explore.mined_triplets_figure(emb, labels, anchors, margin=0.3)
    assert isinstance(fig, Figure) and len(fig.axes) == len(losses.STRATEGIES)
    for ax, strategy in zip(fig.axes, losses.STRATEGIES):
        triplets = explore.mined_triplets(emb, labels, margin=0.3, strategy=strategy)
        shown = np.isin(triplets.anchor, anchors).sum()
        # positives (one scatter) and negatives (inactive + active scatters) per triplet
        points = [len(c.get_offsets()) for c in ax.collections]
        assert points == [shown, (~triplets.active[np.isin(triplets.anchor, anchors)]).sum(),
                          triplets.active[np.isin(triplets.anchor, anchors)].sum()]
    with pytest.raises(ValueError, match="anchors"):
        explore.mined_triplets_figure(emb, labels, [len(labels)], margin=0.3)
    assert len(explore.distance_matrix_figure(emb, labels).axes) == 2  # matrix + colour bar
    assert len(explore.distance_distribution_figure(emb, labels, margin=0.3).axes) == 2
    responses = {s: explore.margin_response(emb, labels, [0.1, 0.4, 1.0], strategy=s, seed=2)
                 for s in ("semihard", "hardest")}
    fig = explore.margin_response_figure([0.1, 0.4, 1.0], responses)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2]
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    oneshot = explore.oneshot_predictions(emb, labels)
    fig = explore.oneshot_figure(images, labels, oneshot, examples=2)
    hits, misses = min(2, oneshot.hit.sum()), min(2, (~oneshot.hit).sum())
    assert len(fig.axes) == 2 * hits + 3 * misses
    neighbours, distances = explore.nearest_neighbours(emb, [0, 5], k=3)
    names = [f"person_{label}" for label in labels]
    fig = explore.neighbours_figure(images, names, [0, 5], neighbours, distances)
    assert len(fig.axes) == 2 * 4
    colours = [ax.title.get_color() for ax in fig.axes[1:4]]
    assert colours == ["green" if labels[n] == labels[0] else "red" for n in neighbours[0]]
    fig = explore.verification_figure(images[:3], images[3:6], [0.1, 0.5, 0.9],
                                      [True, True, False], threshold=0.6)
    assert len(fig.axes) == 3 * 2
    assert [fig.axes[i].get_title(loc="left").endswith("(right)") for i in (0, 2, 4)] == [
        True, True, True]
    fig = explore.verification_figure(images[:1], images[1:2], [0.7], [True], threshold=0.6)
    assert fig.axes[0].get_title(loc="left") == "d = 0.700: different (wrong)"
    with pytest.raises(ValueError, match="same length"):
        explore.verification_figure(images[:2], images[2:3], [0.1], [True], threshold=0.6)


# ----------------------------------------------------------------------------------------------
# The notebooks.


def notebook_path(name: str) -> pathlib.Path:
    return REPO_ROOT / "notebooks" / f"{name}.ipynb"


def parameters_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]


def small_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with its parameters cell (tagged "parameters", `SMALL = False`) set to
    `SMALL = True`: the tiny sizes the tests run. ValueError when the cell is not there."""
    cells = parameters_cells(notebook)
    if len(cells) != 1 or "SMALL = False" not in cells[0].source:
        raise ValueError("the notebook needs one code cell tagged 'parameters' that sets "
                         "SMALL = False")
    cells[0].source = cells[0].source.replace("SMALL = False", "SMALL = True")
    return notebook


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_size_is_a_parameter(name):
    """Full size as committed; the tests' switch turns that one cell to SMALL = True, and no
    other cell sets SMALL."""
    notebook = nbformat.read(notebook_path(name), as_version=4)
    committed, small = {}, {}
    exec(parameters_cells(notebook)[0].source, committed)
    exec(parameters_cells(small_notebook(notebook))[0].source, small)
    assert committed["SMALL"] is False and small["SMALL"] is True
    others = [c.source for c in notebook.cells
              if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    assert not [source for source in others if "SMALL =" in source]
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        small_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("SMALL = 1")]))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    notebook = nbformat.read(notebook_path(name), as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
            # Public API only: no private names of the package.
            assert "._" not in cell.source and "import _" not in cell.source, cell.source[:60]


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> Iterator[str]:
    """A kernelspec running this interpreter, in a temporary JUPYTER_PATH (so the test needs
    no kernel installed beforehand, e.g. in CI's fresh venv)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="facenet_jax_test", prefix=str(prefix))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield "facenet_jax_test"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_small(name, kernel_name, tmp_path):
    from nbclient import NotebookClient

    notebook = small_notebook(nbformat.read(notebook_path(name), as_version=4))
    # The kernel finds the package from this checkout; it runs on one CPU device (conftest's
    # 8 forced devices would only add compile time here).
    env = cli_env(devices=1, PYTHONPATH=os.pathsep.join([str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    figures = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"]
        pngs = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        tags = cell.metadata.get("tags", [])
        if "figure" in tags:
            assert pngs >= 1, f"no figure from: {cell.source[:60]}"
        if "table" in tags:
            assert any(o.output_type == "stream" and "strategy" in o.text
                       for o in cell.outputs), cell.source[:60]
        figures += pngs
    assert figures >= NOTEBOOKS[name]
