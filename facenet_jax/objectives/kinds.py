"""`config.loss.kind` → what it stands for: the `OBJECTIVES` registry.

An entry (`ObjectiveKind`) says how to build the objective from a config, whether it has
parameters of its own, which parts of `config.loss` it reads, and how a sweep table shows its
rows. Everything that used to compare `loss.kind` with a name asks the entry instead:
`objectives.from_config`, `has_parameters` and `validate_objective_config`, the config
comparison that ignores keys a run does not read (`config.changed_keys`), and the sweep tables
(`sweep.kinds`). Each objective module registers its own kinds (triplet.py: "triplet";
classification.py: "classification", "combined").

The parts of `config.loss` (a dotted key belongs to the longest part that prefixes it):
LOSS_SETTINGS, the triplet loss's settings at the top of config.loss (loss.margin,
loss.strategy, loss.distance, loss.soft, loss.options.*, loss.warmup_*); MEMORY_SETTINGS,
the cross-batch memory (loss.memory.*); CLASSIFICATION_SETTINGS (loss.classification.*); and
TRIPLET_WEIGHT_KEY (loss.triplet_weight). `loss.kind` itself and every key outside config.loss
are read by every objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from facenet_jax.objectives.base import Objective
from facenet_jax.registry import Registry

KIND_KEY = "loss.kind"
LOSS_SETTINGS = "loss."
MEMORY_SETTINGS = "loss.memory."
CLASSIFICATION_SETTINGS = "loss.classification."
TRIPLET_WEIGHT_KEY = "loss.triplet_weight"
LOSS_PARTS = (LOSS_SETTINGS, MEMORY_SETTINGS, CLASSIFICATION_SETTINGS, TRIPLET_WEIGHT_KEY)

# (config, *, warmup, num_classes, num_shards) -> the objective a run trains.
Builder = Callable[..., Objective]
# (the training log's rows, the row's flattened config) -> collapsed?, None when unknown.
CollapseRule = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], "bool | None"]


def loss_part(key: str) -> str | None:
    """The part of config.loss a dotted key belongs to (the longest LOSS_PARTS prefix), or
    None for `loss.kind` and keys outside config.loss."""
    if key == KIND_KEY or not key.startswith(LOSS_SETTINGS):
        return None
    return max((part for part in LOSS_PARTS if key.startswith(part)), key=len)


def _as_is(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How a sweep table shows the rows of one objective kind (sweep/kinds.py).

    leading: config columns shown first when a row of this kind is in the table; trailing:
    shown after the columns the cells vary (α with its distance: they mean nothing apart);
    metrics: metric columns added after "auc" (and its std); note: a sentence results.md adds
    about these rows; collapsed: the collapse flag of a row; resolve: a row's flattened config
    -> the values it really trains with where they differ from the config's (e.g. a head's
    paper defaults for unset keys).
    """

    collapsed: CollapseRule
    leading: tuple[str, ...] = ()
    trailing: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    note: str = ""
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] = _as_is


@dataclasses.dataclass(frozen=True)
class ObjectiveKind:
    """One `loss.kind`: `build` makes the objective; `parts`: the LOSS_PARTS it reads;
    `has_parameters`: whether it owns trained parameters (class centres), which then need the
    number of training classes to build; `table`: its sweep-table rendering."""

    build: Builder
    parts: frozenset[str]
    has_parameters: bool
    table: TableSpec

    def reads(self, key: str) -> bool:
        """Whether a run of this kind reads the dotted config key (every key outside
        config.loss, and loss.kind, count as read)."""
        part = loss_part(key)
        return part is None or part in self.parts


# config.loss.kind -> ObjectiveKind.
OBJECTIVES: Registry[ObjectiveKind] = Registry("loss.kind", valid="valid kinds")


def kind_of(config: ml_collections.ConfigDict) -> ObjectiveKind:
    """The entry of config.loss.kind (ValueError naming the valid kinds)."""
    return OBJECTIVES.get(config.loss.kind, key=KIND_KEY)


def kinds_reading(key: str) -> list[str]:
    """The registered kinds that read `key`."""
    return [name for name in OBJECTIVES.names() if OBJECTIVES.get(name).reads(key)]


def unread_keys(flat: Mapping[str, Any]) -> list[str]:
    """The keys of a flattened config that its loss.kind does not read ([] for an unknown or
    missing kind: nothing is known to be unread)."""
    kind = flat.get(KIND_KEY)
    if kind not in OBJECTIVES:
        return []
    entry = OBJECTIVES.get(kind)
    return [key for key in flat if not entry.reads(key)]
