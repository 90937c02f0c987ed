"""Evaluation and training figures (matplotlib, rendered with Agg; no pyplot global state).

Each `*_figure` function builds a `matplotlib.figure.Figure` from numpy inputs; each `plot_*`
function writes one as PNG and returns the path written (the only effects here).
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from facenet_jax.runfiles import atomic_write_bytes

TRAINING_KEYS = ("loss", "active_fraction", "mean_d_ap", "mean_d_an", "embedding_spread",
                 "eval/accuracy")
EMBEDDING_MAP_METHODS = ("pca",)
_MAX_LEGEND_IDENTITIES = 20
_DPI = 110


def save_figure(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Writes `fig` as a PNG to `path` atomically (a reader or a second writer never sees a torn
    file) and returns the path; the folder is created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return atomic_write_bytes(path, buffer.getvalue())


def _pairs_arrays(distances: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    same = np.asarray(is_same, dtype=bool)
    if d.ndim != 1 or d.shape != same.shape:
        raise ValueError(f"distances {d.shape} and is_same {same.shape} must be 1-D of one length")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN/inf; the embeddings diverged")
    return d, same


# ----------------------------------------------------------------------------------------------
# ROC.


def roc_figure(far: Any, tar: Any, *, label: str | None = None, auc: float | None = None,
               eer: float | None = None, log_far: bool = False, far_min: float | None = None,
               points: Mapping[str, tuple[float, float]] | None = None,
               title: str | None = None) -> Figure:
    """TAR against FAR (both [T], from metrics.roc_curve); the EER point where TAR = 1 − FAR.

    log_far: FAR on a log axis (points with FAR = 0 cannot be drawn there and are left out),
    the view that shows VAL at FAR = 1e-3 / 1e-2; far_min: its left end (default: the smallest
    FAR > 0 on the curve). points: operating points {label: (far, tar)} marked on the curve
    (e.g. VAL@FAR=1e-3, TAR@FAR=1e-4), each labelled with its TAR and its actual FAR (a point
    named for a FAR target can sit elsewhere: an unresolved VAL@FAR).
    """
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    if far.ndim != 1 or far.shape != tar.shape:
        raise ValueError(f"far {far.shape} and tar {tar.shape} must be 1-D of one length")
    details = [text for text in (label, None if auc is None else f"AUC {auc:.4f}",
                                 None if eer is None else f"EER {eer:.4f}") if text]
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    shown = far > 0 if log_far else np.ones_like(far, dtype=bool)
    ax.plot(far[shown], tar[shown], lw=1.8, label=", ".join(details) or "ROC")
    if eer is not None:
        ax.plot([eer], [1 - eer], "o", color="C3", ms=6, label="equal error rate")
    for i, (name, (point_far, point_tar)) in enumerate((points or {}).items()):
        ax.plot([point_far], [point_tar], "sD^v<>"[i % 6], color=f"C{(i + 4) % 10}", ms=6,
                label=f"{name}: TAR {point_tar:.4f} at FAR {point_far:.1e}")
    if log_far:
        ax.set_xscale("log")
        positive = far[far > 0]
        ax.set_xlim(far_min or (positive.min() if positive.size else 1e-4), 1)
    else:
        ax.plot([0, 1], [1, 0], ls=":", color="gray", lw=1, label="FAR = 1 − TAR")
        ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR)" + (", log scale" if log_far else ""))
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title or "Verification ROC", fontsize=9 if title else None)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(far: Any, tar: Any, path: str | pathlib.Path, *, label: str | None = None,
             auc: float | None = None, eer: float | None = None,
             log_far: bool = False, far_min: float | None = None,
             points: Mapping[str, tuple[float, float]] | None = None,
             title: str | None = None) -> pathlib.Path:
    """Writes `roc_figure(...)` to path (PNG); returns the path."""
    return save_figure(roc_figure(far, tar, label=label, auc=auc, eer=eer, log_far=log_far,
                            far_min=far_min, points=points, title=title), path)


# ----------------------------------------------------------------------------------------------
# Distance histogram.


def distance_histogram_figure(distances: Any, is_same: Any, threshold: float, *,
                              title: str | None = None, bins: int = 50) -> Figure:
    """Densities of same- and different-identity pair distances ([M] each, shared bins) with the
    threshold (pairs at or below it are accepted) as a vertical line; a threshold of -inf (the
    10-fold search's "accept nothing", e.g. for collapsed embeddings) is named in the legend."""
    d, same = _pairs_arrays(distances, is_same)
    finite = bool(np.isfinite(threshold))
    edges = np.histogram_bin_edges(np.append(d, threshold) if finite else d, bins=bins)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for mask, name, color in ((same, "same identity", "C2"), (~same, "different identity",
                                                                "C3")):
        if mask.any():
            ax.hist(d[mask], bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{name} ({int(mask.sum())} pairs)")
    ax.axvline(threshold if finite else edges[0], color="k", ls="--" if finite else ":",
               lw=1.2, label=f"threshold {threshold:.4g}" if finite
               else "threshold -inf (accepts nothing)")
    ax.set_xlabel("pair distance")
    ax.set_ylabel("density")
    ax.set_title(title or "Pair distances", fontsize=9 if title else None)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_distance_histogram(distances: Any, is_same: Any, threshold: float,
                            path: str | pathlib.Path, *, title: str | None = None
                            ) -> pathlib.Path:
    """Writes `distance_histogram_figure(...)` to path (PNG); returns the path."""
    return save_figure(distance_histogram_figure(distances, is_same, threshold, title=title), path)


# ----------------------------------------------------------------------------------------------
# Embedding map.


def pca_2d(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Projection on the first two principal components (numpy SVD of the centred data).

    embeddings [N,D] (N ≥ 2, D ≥ 2) -> (coordinates [N,2], explained variance ratio [2]).
    Each component's sign is fixed so its largest-magnitude loading is positive.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"PCA to 2-D needs embeddings [N ≥ 2, D ≥ 2], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN/inf; the model diverged")
    centred = x - x.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:2]
    signs = np.sign(components[np.arange(2), np.argmax(np.abs(components), axis=1)])
    components = components * signs[:, None]
    variance = singular**2
    total = variance.sum()
    ratio = variance[:2] / total if total > 0 else np.zeros(2)
    return centred @ components.T, ratio


def embedding_map_figure(embeddings: Any, labels: Any, *, method: str = "pca",
                         names: Sequence[str] | None = None) -> Figure:
    """A 2-D map of embeddings [N,D] coloured by labels [N] (legend up to 20 identities; names
    [num labels] optional, indexed by label)."""
    if method not in EMBEDDING_MAP_METHODS:
        raise ValueError(f"unknown method {method!r}; available: {EMBEDDING_MAP_METHODS}")
    labels = np.asarray(labels)
    points, ratio = pca_2d(embeddings)
    if labels.shape != (len(points),):
        raise ValueError(f"labels {labels.shape} must be [N] with N = {len(points)}")
    identities = np.unique(labels)
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(identities))]
    markers = "ovs^Dp*hX<>"
    for i, identity in enumerate(identities):
        mask = labels == identity
        name = names[identity] if names is not None else str(identity)
        ax.scatter(points[mask, 0], points[mask, 1], s=18, color=colors[i],
                   marker=markers[(i // 10) % len(markers)], alpha=0.8, label=name)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(f"Embeddings, PCA ({len(points)} images, {len(identities)} identities)")
    if len(identities) <= _MAX_LEGEND_IDENTITIES:
        ax.legend(fontsize=7, markerscale=0.8, loc="best", ncols=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_embedding_map(embeddings: Any, labels: Any, path: str | pathlib.Path, *,
                       method: str = "pca", names: Sequence[str] | None = None
                       ) -> pathlib.Path:
    """Writes `embedding_map_figure(...)` to path (PNG); returns the path."""
    return save_figure(embedding_map_figure(embeddings, labels, method=method, names=names), path)


# ----------------------------------------------------------------------------------------------
# Training curves.


def training_series(metrics_rows: Sequence[Mapping[str, Any]], key: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key over metrics.jsonl rows, skipping rows without a finite value
    for it (the log writes non-finite values as null)."""
    points = [(row["step"], row[key]) for row in metrics_rows
              if isinstance(row.get(key), (int, float)) and np.isfinite(row[key])]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def training_curves_figure(metrics_rows: Sequence[Mapping[str, Any]],
                           keys: Sequence[str] = TRAINING_KEYS) -> Figure:
    """One panel per key that has values in the rows (dicts with "step", as in metrics.jsonl),
    value against step."""
    series = {key: training_series(metrics_rows, key) for key in keys}
    series = {key: s for key, s in series.items() if len(s[0])}
    if not series:
        present = sorted({k for row in metrics_rows for k in row} - {"step"})
        raise ValueError(f"none of {list(keys)} has a value in the {len(metrics_rows)} rows; "
                         f"keys present: {present}")
    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    fig = Figure(figsize=(4 * columns, 3 * rows))
    for i, (key, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.plot(steps, values, "-" if len(steps) > 1 else "o", lw=1.4)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path,
                         keys: Sequence[str] = TRAINING_KEYS) -> pathlib.Path:
    """Writes `training_curves_figure(...)` to path (PNG); returns the path."""
    return save_figure(training_curves_figure(metrics_rows, keys), path)


# ----------------------------------------------------------------------------------------------
# Cross-validation folds.


def fold_bars_figure(folds: Sequence[int], values: Mapping[str, Sequence[float]], *,
                     title: str | None = None) -> Figure:
    """Grouped bars: one group per fold, one bar per metric (values {metric: [per fold]}, each
    as long as folds), with each metric's mean over the folds as a dashed line of its colour."""
    folds = list(folds)
    if not folds or any(len(v) != len(folds) for v in values.values()):
        raise ValueError(f"values need one number per fold ({len(folds)} folds), got "
                         f"{ {k: len(v) for k, v in values.items()} }")
    fig = Figure(figsize=(max(5.0, 1.2 * len(folds) + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(folds))
    for i, (name, series) in enumerate(values.items()):
        series = np.asarray(series, dtype=np.float64)
        ax.bar(x + (i - (len(values) - 1) / 2) * width, series, width, color=f"C{i}",
               label=f"{name} (mean {np.nanmean(series):.4f})")
        ax.axhline(np.nanmean(series), color=f"C{i}", ls="--", lw=1)
    ax.set_xticks(x, [f"fold {k}" for k in folds])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title(title or "Cross-validation folds", fontsize=9 if title else None)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_fold_bars(folds: Sequence[int], values: Mapping[str, Sequence[float]],
                   path: str | pathlib.Path, *, title: str | None = None) -> pathlib.Path:
    """Writes `fold_bars_figure(...)` to path (PNG); returns the path."""
    return save_figure(fold_bars_figure(folds, values, title=title), path)
