"""The sweep's figures (matplotlib Figures as in facenet_jax.eval.plots, no pyplot state).

Both take the result rows of facenet_jax.sweep.report: `accuracy_figure` one row per cell
(over seeds: mean, and std as error bars), `active_fraction_figure` one row per run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from facenet_jax.eval.plots import save_figure
from facenet_jax.sweep.spec import CELL_REFERENCE_PREFIX

_LEGEND_WIDTH = 2.0  # inches right of the panels for the figure legend
# plot_accuracy's axis and panels: α with its distance (rows whose objective reads both).
MARGIN_AXES = ("loss.margin", "loss.distance")
NOT_SERIES = (*MARGIN_AXES, "seed")  # axes and panels, not lines


def series_keys(config_keys: Sequence[str]) -> list[str]:
    """Overridden keys other than margin, distance and seed: what tells the lines apart."""
    keys = [c for c in config_keys if c not in NOT_SERIES]
    return [k for k in keys if k != "loss.strategy"] + ["loss.strategy"]


def series_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" if k != "loss.strategy" else
                     str(row[k]) for k in keys) or "all"


def accuracy_figure(cells: Sequence[Mapping[str, Any]], config_keys: Sequence[str]) -> Figure:
    """Accuracy against α (log x), one line per strategy, one panel per distance; each point a
    cell's mean over its finished seeds with ± sample std over seeds as an error bar (n ≥ 2);
    cells where a seed collapsed marked ×; the pixel baseline dashed."""
    done = [r for r in cells if r["n"] and r["accuracy"] is not None]
    distances = _in_order(r["loss.distance"] for r in cells)
    keys = series_keys(config_keys)
    labels = _in_order(series_label(r, keys) for r in cells)
    colors, styles = _line_styles(labels)
    width = 5.5 * len(distances) + _LEGEND_WIDTH
    fig = Figure(figsize=(width, 4.2))
    axes = fig.subplots(1, len(distances), sharey=True, squeeze=False)[0]
    for ax, distance in zip(axes, distances):
        for label in labels:
            points = sorted((r for r in done if r["loss.distance"] == distance
                             and series_label(r, keys) == label), key=lambda r: r["loss.margin"])
            if not points:
                continue
            margins = [r["loss.margin"] for r in points]
            errors = [r["accuracy_std"] or 0.0 for r in points]
            ax.errorbar(margins, [r["accuracy"] for r in points],
                        yerr=errors if any(errors) else None, marker="o", ls=styles[label],
                        color=colors[label], label=label, lw=1.5, ms=4, capsize=3)
            collapsed = [(r["loss.margin"], r["accuracy"]) for r in points if r["collapsed"]]
            if collapsed:
                ax.plot(*zip(*collapsed), "x", color=colors[label], ms=10, mew=2)
        baselines = {r["pixel_accuracy"] for r in cells
                     if r["loss.distance"] == distance and r["pixel_accuracy"] is not None}
        for baseline in baselines:
            ax.axhline(baseline, color="gray", ls="--", lw=1)
        if baselines:
            ax.text(0.01, min(baselines), " pixels", color="gray", va="bottom",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel(f"margin α ({distance} distance)")
        ax.set_title(f"distance = {distance}")
        ax.grid(alpha=0.3)
    seeded = max(r["runs"] for r in cells) > 1
    axes[0].set_ylabel("10-fold verification accuracy" + (
        "\n(mean ± sample std over seeds)" if seeded else ""))
    handles, names = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    handles.append(Line2D([], [], color="k", marker="x", ls="", ms=8, mew=2))
    names.append("a seed collapsed" if seeded else "collapsed")
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_WIDTH / width, 1))
    return fig


def active_fraction_figure(runs: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
                           histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Active-triplet fraction over training: a panel per (distance, α), a line per strategy
    (first seed only)."""
    keys = series_keys(config_keys)
    labels = _in_order(series_label(r, keys) for r in runs)
    colors, styles = _line_styles(labels)
    distances = _in_order(r["loss.distance"] for r in runs)
    margins = sorted({r["loss.margin"] for r in runs})
    width = 2.9 * len(margins) + _LEGEND_WIDTH
    fig = Figure(figsize=(width, 2.5 * len(distances) + 0.4))
    axes = fig.subplots(len(distances), len(margins), sharex=True, sharey=True, squeeze=False)
    for i, distance in enumerate(distances):
        for j, margin in enumerate(margins):
            ax = axes[i][j]
            drawn = set()
            for row in runs:
                label = series_label(row, keys)
                if (row["loss.distance"], row["loss.margin"]) != (distance, margin) or (
                        label in drawn):
                    continue
                history = [h for h in histories.get(row["name"], ())
                           if h.get("active_fraction") is not None]
                if history:
                    drawn.add(label)
                    ax.plot([h["step"] for h in history],
                            [h["active_fraction"] for h in history],
                            color=colors[label], ls=styles[label], lw=1.6, label=label)
            ax.set_title(f"{distance}, α={margin:g}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == len(distances) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("active fraction")
    handles = [Line2D([], [], color=colors[label], ls=styles[label], lw=2) for label in labels]
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_WIDTH / width, 1))
    return fig


def cell_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """"leaf=value, ..." over `keys` where the row has a value (a cell reference shown by its
    cell's name: "@cell:a-1__b-2" → "a-1,b-2")."""
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.startswith(CELL_REFERENCE_PREFIX):
            value = value[len(CELL_REFERENCE_PREFIX):].replace("__", ",")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ", ".join(parts) or "base"


def varying_keys(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """The keys (but seed) whose value differs between rows: what tells the rows apart."""
    return [k for k in keys if k != "seed" and len({repr(r.get(k)) for r in rows}) > 1]


def accuracy_by_cell_figure(cells: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
                            metrics: Sequence[str] = ("accuracy", "oneshot_top1")) -> Figure:
    """A panel per metric, a horizontal bar per cell (its mean over finished seeds, ± std over
    seeds where the row has one), cells where a seed collapsed hatched; for sweeps whose rows
    differ in objective rather than in α (sweep.kinds), where accuracy_figure's α axis is
    meaningless."""
    keys = varying_keys(cells, config_keys)
    labels = [cell_label(r, keys) for r in cells]
    height = 0.4 * len(cells) + 1.2
    label_width = 0.055 * max(len(label) for label in labels) + 0.3  # inches at fontsize 7
    width = 3.5 * len(metrics) + label_width + 0.3
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    positions = list(range(len(cells)))[::-1]
    for ax, metric in zip(axes, metrics):
        values = [r.get(metric) or 0.0 for r in cells]
        errors = [r.get(f"{metric}_std") or 0.0 for r in cells]
        bars = ax.barh(positions, values, xerr=errors if any(errors) else None, color="C0",
                       capsize=3)
        for bar, row in zip(bars, cells):
            if row.get("collapsed"):
                bar.set_hatch("xx")
                bar.set_facecolor("C3")
        baselines = {r["pixel_accuracy"] for r in cells if r.get("pixel_accuracy") is not None}
        if metric == "accuracy":
            for baseline in baselines:
                ax.axvline(baseline, color="gray", ls="--", lw=1)
        ax.set_xlabel(metric + (" (dashed: pixels)" if metric == "accuracy" and baselines
                                else ""))
        # From a little below the lowest bar (or baseline): rows often differ in the 2nd digit.
        low = min([v - e for v, e in zip(values, errors)]
                  + (list(baselines) if metric == "accuracy" else []))
        ax.set_xlim(max(0.0, low - 0.02), 1.0)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(positions, labels, fontsize=7)
    fig.suptitle("per cell (hatched red: a seed collapsed)", fontsize=9)
    # The labels' room on the left in inches (tight_layout would shrink it to fit the panels).
    fig.subplots_adjust(left=label_width / width, right=1 - 0.3 / width, bottom=0.6 / height,
                        top=1 - 0.45 / height, wspace=0.15)
    return fig


def plot_accuracy_by_cell(cells: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
                          path: pathlib.Path) -> pathlib.Path:
    """Writes accuracy_by_cell_figure(...) to path (PNG); returns the path."""
    return save_figure(accuracy_by_cell_figure(cells, config_keys), path)


def plot_accuracy(cells: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
                  path: pathlib.Path) -> pathlib.Path:
    """Writes accuracy_figure(...) to path (PNG); returns the path."""
    return save_figure(accuracy_figure(cells, config_keys), path)


def plot_active_fraction(runs: Sequence[Mapping[str, Any]], config_keys: Sequence[str],
                         histories: Mapping[str, Sequence[Mapping[str, Any]]],
                         path: pathlib.Path) -> pathlib.Path:
    """Writes active_fraction_figure(...) to path (PNG); returns the path."""
    return save_figure(active_fraction_figure(runs, config_keys, histories), path)


def _line_styles(labels: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A colour and a dash pattern per series: series that coincide (e.g. several strategies
    with every triplet active) stay visible as dashes over one another."""
    colors = matplotlib.colormaps["tab10"].colors
    dashes = ("-", "--", "-.", ":")
    return ({label: colors[i % len(colors)] for i, label in enumerate(labels)},
            {label: dashes[i % len(dashes)] for i, label in enumerate(labels)})


def _in_order(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-seen order (the sweep's own order for legends and panels)."""
    return list(dict.fromkeys(values))
