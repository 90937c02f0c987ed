"""A sweep table's config columns, taken from the differences between its cells, and what each
row's objective shows, asked of its `loss.kind` entry (`objectives.OBJECTIVES`, its `table`)
(pure).

Config columns: the keys the cells set (in first-seen order) and every other key whose value
differs between the cells' resolved configs (a head's unset s and m read as the paper's), so a
new objective or config key needs no teaching here. Around them, each objective kind present
adds its own: `table.leading` first (a margin-softmax head: loss.kind, the head, its s and m),
`table.trailing` last (a triplet loss: α with its distance, and the strategy), and
`table.metrics` among the metrics. A sweep of triplet runs thus gets the tables it always had.
A row shows only the keys its objective reads (`ObjectiveKind.reads`; others empty), a head's
resolved s and m, and its kind's collapse flag (`table.collapsed`).

The objectives are imported inside the functions: importing the sweep driver stays JAX-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facenet_jax.objectives import ObjectiveKind

KIND_KEY = "loss.kind"
_ABSENT = object()  # a key a config lacks: differs from any value, None included


def kind_of(flat: Mapping[str, Any]) -> ObjectiveKind:
    """The registry entry of the row's loss.kind (ValueError naming the valid kinds)."""
    from facenet_jax.objectives import OBJECTIVES
    return OBJECTIVES.get(flat[KIND_KEY], key=KIND_KEY)


def present_kinds(flats: Sequence[Mapping[str, Any]]) -> list[ObjectiveKind]:
    """The entries of the kinds these flattened configs train, each once, in registry order."""
    from facenet_jax.objectives import OBJECTIVES
    names = {flat[KIND_KEY] for flat in flats}
    for name in names:
        OBJECTIVES.get(name, key=KIND_KEY)  # an unknown kind: its error, naming the valid ones
    return [OBJECTIVES.get(name) for name in OBJECTIVES.names() if name in names]


def resolved(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened config with the values its objective really trains with (`table.resolve`)."""
    return {**flat, **kind_of(flat).table.resolve(flat)}


def differing_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose resolved value differs between the configs (a key some lack counts), in the
    order the configs first hold them."""
    values = [resolved(flat) for flat in flats]
    keys = list(dict.fromkeys(key for flat in values for key in flat))
    return [key for key in keys
            if len({repr(flat.get(key, _ABSENT)) for flat in values}) > 1]


def config_columns(cells: Sequence[Mapping[str, Any]], flats: Sequence[Mapping[str, Any]]
                   ) -> list[str]:
    """The table's config columns: the present kinds' leading columns, the keys the cells
    set (first-seen order), the other keys whose resolved values differ between the cells'
    flattened configs `flats` (one per cell), then the present kinds' trailing columns."""
    kinds = present_kinds(flats)
    ordered = [*(key for kind in kinds for key in kind.table.leading),
               *(key for cell in cells for key in cell),
               *differing_keys(flats),
               *(key for kind in kinds for key in kind.table.trailing)]
    return list(dict.fromkeys(ordered))


def extra_metrics(kinds: Sequence[ObjectiveKind]) -> list[str]:
    """The metric columns the present kinds add (first-seen order)."""
    return list(dict.fromkeys(metric for kind in kinds for metric in kind.table.metrics))


def with_metrics(metrics: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Metric columns with `extra` after "auc_std" (or "auc"); unchanged without extras."""
    metrics = list(metrics)
    extra = [metric for metric in extra if metric not in metrics]
    if not extra:
        return metrics
    after = "auc_std" if "auc_std" in metrics else "auc"
    at = metrics.index(after) + 1
    return metrics[:at] + extra + metrics[at:]


def objective_values(flat: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The row's values of `keys` that depend on its objective: the resolved ones (a head's
    s and m; None for a head without one) and None for the keys the objective does not read
    (a triplet row's head keys, a classification row's triplet keys)."""
    kind = kind_of(flat)
    values = dict(kind.table.resolve(flat))
    values.update({key: None for key in keys if not kind.reads(key)})
    return {key: value for key, value in values.items() if key in keys}


def row_collapsed(train_rows: Sequence[Mapping[str, Any]], flat: Mapping[str, Any]
                  ) -> bool | None:
    """The collapse flag of a row, by its kind's rule (`table.collapsed`)."""
    return kind_of(flat).table.collapsed(train_rows, flat)


def notes(kinds: Sequence[ObjectiveKind]) -> str:
    """The present kinds' sentences for results.md, each once, with a leading space."""
    return "".join(f" {note}" for note in dict.fromkeys(kind.table.note for kind in kinds)
                   if note)


def described_columns() -> set[str]:
    """The columns the registered kinds declare (leading and trailing): results.md shows their
    numbers to 4 significant digits (α = 0.05, s = 64, m = 0.35)."""
    from facenet_jax.objectives import OBJECTIVES
    tables = [OBJECTIVES.get(name).table for name in OBJECTIVES.names()]
    return {key for table in tables for key in (*table.leading, *table.trailing)}


def every_row_reads(kinds: Sequence[ObjectiveKind], keys: Sequence[str]) -> bool:
    """Whether every present kind reads all of `keys` (e.g. a plot's axes)."""
    return all(kind.reads(key) for kind in kinds for key in keys)
