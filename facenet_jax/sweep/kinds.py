"""Table columns and the collapse rule per objective (`loss.kind`), for sweeps that mix triplet
rows with classification or combined ones (pure).

A sweep whose runs are all triplet runs gets the tables it always had: none of this adds a
column to it. Once any run is a classification or combined run, the tables gain `loss.kind`,
the head and its resolved s and m (`losses.resolve_head`: left unset, the paper's values) and
the one-shot top-1 column, and each row shows only the keys its objective reads: a
classification row leaves the triplet keys (α, strategy, distance, soft, ...) empty, a
triplet row the head's; a combined row shows both. The collapse column of a classification or
combined row uses the spread-only rule (`collapse.is_spread_collapsed`): a margin-softmax loss
has no pinned value to compare with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from facenet_jax.collapse import is_collapsed, is_spread_collapsed

KIND_KEY = "loss.kind"
HEAD_KEY = "loss.classification.head"
SCALE_KEY = "loss.classification.scale"
MARGIN_KEY = "loss.classification.margin"
OBJECTIVE_COLUMNS = (KIND_KEY, HEAD_KEY, SCALE_KEY, MARGIN_KEY)
# Metrics the classification tables add (eval.json's one-shot identification).
OBJECTIVE_METRICS = ("oneshot_top1",)
_HEAD_PREFIX = "loss.classification."
_SHARED_LOSS_KEYS = (KIND_KEY, "loss.triplet_weight")


def kind_of(flat: Mapping[str, Any]) -> str:
    """The row's loss.kind."""
    return flat[KIND_KEY]


def uses_classification(flats: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any of these flattened configs trains a classification or combined objective."""
    return any(kind_of(flat) != "triplet" for flat in flats)


def objective_metrics(metrics: Sequence[str], classification: bool) -> list[str]:
    """Metric columns with, when `classification`, OBJECTIVE_METRICS after "auc"_std (or
    "auc")."""
    metrics = list(metrics)
    if not classification:
        return metrics
    after = "auc_std" if "auc_std" in metrics else "auc"
    at = metrics.index(after) + 1
    return metrics[:at] + list(OBJECTIVE_METRICS) + metrics[at:]


def objective_columns(columns: Sequence[str], classification: bool) -> list[str]:
    """`columns` (config keys, then the metrics from "accuracy" on) with, when
    `classification`, the OBJECTIVE_COLUMNS first (kind, head, s, m side by side) and the
    OBJECTIVE_METRICS among the metrics."""
    columns = list(columns)
    if not classification:
        return columns
    first_metric = columns.index("accuracy")
    return (list(OBJECTIVE_COLUMNS)
            + [c for c in columns[:first_metric] if c not in OBJECTIVE_COLUMNS]
            + objective_metrics(columns[first_metric:], classification))


def _is_triplet_key(key: str) -> bool:
    return (key.startswith("loss.") and not key.startswith(_HEAD_PREFIX)
            and key not in _SHARED_LOSS_KEYS)


def objective_values(flat: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The row's values of `keys` that depend on its objective: the head's resolved scale and
    margin (None for a head without one), and None for the keys the objective does not read
    (a triplet row's head keys, a classification row's triplet keys)."""
    from facenet_jax.losses import resolve_head  # local: the sweep driver stays JAX-free

    kind = kind_of(flat)
    values: dict[str, Any] = {}
    if kind != "triplet" and HEAD_KEY in flat:
        scale, margin = resolve_head(flat[HEAD_KEY], flat.get(SCALE_KEY), flat.get(MARGIN_KEY))
        values.update({SCALE_KEY: scale, MARGIN_KEY: margin})
    for key in keys:
        if (kind == "triplet" and (key.startswith(_HEAD_PREFIX) or key == "loss.triplet_weight")
                or kind == "classification" and (_is_triplet_key(key)
                                                 or key == "loss.triplet_weight")):
            values[key] = None
    return {key: value for key, value in values.items() if key in keys}


def row_collapsed(train_rows: Sequence[Mapping[str, Any]], flat: Mapping[str, Any]
                  ) -> bool | None:
    """The collapse flag of a row: the triplet rule (`collapse.is_collapsed`, with the row's
    α, distance and soft margin) for triplet rows, the spread-only rule otherwise."""
    if kind_of(flat) != "triplet":
        return is_spread_collapsed(train_rows)
    return is_collapsed(train_rows, margin=flat.get("loss.margin", 0.0),
                        distance=flat.get("loss.distance", "squared"),
                        soft=bool(flat.get("loss.soft")))
