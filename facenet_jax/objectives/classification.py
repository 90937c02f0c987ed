"""Margin-softmax objectives (softmax, NormFace, CosFace, ArcFace) with the class centres
sharded over the mesh, and the combined classification + triplet objective.

The centres [C, D] (and the softmax head's bias [C]) are split along C over the mesh axis: the
device at index i holds classes [i·C/n, (i+1)·C/n) (C padded up to a multiple of n; padded
classes never enter the softmax). Each device computes the logits of its class shard against
the all-gathered global batch, the softmax's max and normaliser are combined with collectives
(losses/classification.py), and the centres' gradients stay on their device. With
`sample_fraction` < 1 (Partial FC, An et al. 2022) a step's softmax uses the batch's classes and
a sample of the others drawn over global class ids from the step's key: the same set on any
mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import collapse, losses
from facenet_jax.objectives.base import Terms
from facenet_jax.objectives.kinds import (CLASSIFICATION_SETTINGS, KIND_KEY, LOSS_SETTINGS,
                                          OBJECTIVES, TRIPLET_WEIGHT_KEY, ObjectiveKind,
                                          TableSpec)
from facenet_jax.objectives.triplet import (TRIPLET_STATS, TRIPLET_TABLE_COLUMNS,
                                            TripletObjective)
from facenet_jax.parallel import AXIS

CLASSIFICATION_STATS = ("loss", "accuracy", "embedding_spread")
# Initial centres ~ N(0, CENTRE_INIT_STD²), as insightface's partial_fc initialises them.
CENTRE_INIT_STD = 0.01
# Folded into the step's key for Partial FC's class sample (the mining keys stay as they were).
_PARTIAL_FC_STREAM = 0x9FC


@dataclasses.dataclass(frozen=True)
class ClassificationObjective:
    """Cross-entropy of a margin-softmax `head` over `num_classes` training identities, the
    centres split over `num_shards` devices (the mesh size)."""

    head: str
    num_classes: int
    num_shards: int = 1
    scale: float | None = None  # None: the head's paper default (losses.DEFAULT_SCALE)
    margin: float | None = None  # None: the head's paper default (losses.DEFAULT_MARGIN)
    sample_fraction: float = 1.0

    stats_keys = CLASSIFICATION_STATS
    progress_fields = (("acc", "accuracy", ".3f"), ("spread", "embedding_spread", ".4f"))
    term_weights = {"classification": 1.0}

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *, num_classes: int,
                    num_shards: int) -> "ClassificationObjective":
        settings = config.loss.classification
        return cls(head=settings.head, num_classes=num_classes, num_shards=num_shards,
                   scale=settings.scale, margin=settings.margin,
                   sample_fraction=float(settings.sample_fraction))

    @property
    def _has_bias(self) -> bool:
        """Whether the head adds a per-class bias (a parameter beside the centres)."""
        return losses.CLASSIFICATION_HEADS.get(self.head).has_bias

    @property
    def shard_size(self) -> int:
        """Classes per device (C rounded up to a multiple of num_shards, then split)."""
        return math.ceil(self.num_classes / self.num_shards)

    def init(self, key: jax.Array, embedding_dim: int) -> dict[str, jax.Array]:
        """centres: [C_padded, D] ~ N(0, CENTRE_INIT_STD²); bias (softmax head): zeros."""
        padded = self.shard_size * self.num_shards
        params = {"centres": CENTRE_INIT_STD * jax.random.normal(key, (padded, embedding_dim),
                                                                 jnp.float32)}
        if self._has_bias:
            params["bias"] = jnp.zeros((padded,), jnp.float32)
        return params

    def param_specs(self) -> dict[str, P]:
        specs = {"centres": P(AXIS)}
        if self._has_bias:
            specs["bias"] = P(AXIS)
        return specs

    def init_extra(self, embedding_dim: int) -> None:
        return None

    def _class_mask(self, labels: jax.Array, key: jax.Array, offset: jax.Array
                    ) -> jax.Array | None:
        """bool [shard_size]: this shard's classes in the softmax (real, and sampled by
        Partial FC), or None when every class of every shard is."""
        padded = self.shard_size * self.num_shards
        if padded == self.num_classes and self.sample_fraction >= 1.0:
            return None
        sampled = losses.partial_fc_mask(key, labels, self.num_classes, self.sample_fraction)
        every = jnp.zeros((padded,), bool).at[:self.num_classes].set(sampled)
        return lax.dynamic_slice(every, (offset,), (self.shard_size,))

    def sums(self, params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
             key: jax.Array) -> Terms:
        """Every device scores the global batch against its class shard; a row's loss is
        summed on the device holding its target class."""
        del extra
        batch = lax.all_gather(embeddings, AXIS, tiled=True)
        batch_labels = lax.all_gather(labels, AXIS, tiled=True)
        offset = lax.axis_index(AXIS) * self.shard_size
        mask = self._class_mask(batch_labels, jax.random.fold_in(key, _PARTIAL_FC_STREAM),
                                offset)
        sums = losses.classification_loss_sums(
            batch, params["centres"], params.get("bias"), batch_labels, head=self.head,
            scale=self.scale, margin=self.margin, label_offset=offset, axis_name=AXIS,
            class_mask=mask)
        return {"classification": {**sums, **_spread_sums(batch)}}

    def reduce(self, terms: Terms, extra: Any) -> dict[str, jax.Array]:
        sums = terms["classification"]
        loss, stats = losses.reduce_classification_sums(sums)
        return {"loss": loss, **stats, "embedding_spread": _spread(sums)}

    def update(self, extra: Any, embeddings: jax.Array, labels: jax.Array,
               step: jax.Array) -> Any:
        return extra

    def collapse_warning(self, rows: list[Mapping[str, float]], step: int) -> str | None:
        return collapse.spread_collapse_warning(rows, step=step)


@dataclasses.dataclass(frozen=True)
class CombinedObjective:
    """classification + triplet_weight × the triplet loss of the same batch (Wen et al.'s and
    FaceNet-era "softmax + metric" training); both terms logged separately."""

    classification: ClassificationObjective
    triplet: TripletObjective
    triplet_weight: float = 1.0

    stats_keys = (("loss", "classification_loss", "accuracy", "triplet_loss")
                  + tuple(k for k in TRIPLET_STATS if k != "loss"))
    progress_fields = (("acc", "accuracy", ".3f"), ("active", "active_fraction", ".3f"),
                       ("spread", "embedding_spread", ".4f"))

    @property
    def term_weights(self) -> Mapping[str, float]:
        return {"classification": 1.0, "triplet": self.triplet_weight}

    def init(self, key: jax.Array, embedding_dim: int) -> dict[str, jax.Array]:
        return self.classification.init(key, embedding_dim)

    def param_specs(self) -> dict[str, P]:
        return self.classification.param_specs()

    def init_extra(self, embedding_dim: int) -> None:
        return None

    def sums(self, params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
             key: jax.Array) -> Terms:
        return {**self.classification.sums(params, None, embeddings, labels, key),
                "triplet": self.triplet.sums({}, None, embeddings, labels, key)["triplet"]}

    def reduce(self, terms: Terms, extra: Any) -> dict[str, jax.Array]:
        classification = self.classification.reduce(terms, None)
        triplet = self.triplet.reduce(terms, None)
        total = classification["loss"] + self.triplet_weight * triplet["loss"]
        return {"loss": total, "classification_loss": classification["loss"],
                "accuracy": classification["accuracy"], "triplet_loss": triplet["loss"],
                **{k: v for k, v in triplet.items() if k != "loss"}}

    def update(self, extra: Any, embeddings: jax.Array, labels: jax.Array,
               step: jax.Array) -> Any:
        return extra

    def collapse_warning(self, rows: list[Mapping[str, float]], step: int) -> str | None:
        return collapse.spread_collapse_warning(rows, step=step)


def _spread_sums(batch: jax.Array) -> dict[str, jax.Array]:
    """The global batch's summed pairwise squared distances and pair count, on device 0 only
    (every device holds the same batch), in O(B·D) instead of B×B: for rows e_i,
    Σ_{i,j} ||e_i − e_j||² = 2B Σ_i ||e_i||² − 2 ||Σ_i e_i||²."""
    batch = lax.stop_gradient(batch.astype(jnp.float32))
    size = batch.shape[0]
    total = 2.0 * size * jnp.sum(batch * batch) - 2.0 * jnp.sum(jnp.sum(batch, axis=0) ** 2)
    first = lax.axis_index(AXIS) == 0
    return {"spread_sum": jnp.where(first, total, 0.0),
            "spread_count": jnp.where(first, float(size * (size - 1)), 0.0)}


def _spread(sums: Mapping[str, jax.Array]) -> jax.Array:
    return sums["spread_sum"] / jnp.maximum(sums["spread_count"], 1.0)


HEAD_KEY = CLASSIFICATION_SETTINGS + "head"
SCALE_KEY = CLASSIFICATION_SETTINGS + "scale"
MARGIN_KEY = CLASSIFICATION_SETTINGS + "margin"


def _build_classification(config: ml_collections.ConfigDict, *, warmup: bool = False,
                          num_classes: int, num_shards: int = 1) -> ClassificationObjective:
    del warmup  # no triplets to warm up
    return ClassificationObjective.from_config(config, num_classes=num_classes,
                                               num_shards=num_shards)


def _build_combined(config: ml_collections.ConfigDict, *, warmup: bool = False,
                    num_classes: int, num_shards: int = 1) -> CombinedObjective:
    return CombinedObjective(
        _build_classification(config, num_classes=num_classes, num_shards=num_shards),
        TripletObjective.from_config(config, warmup=warmup),
        triplet_weight=float(config.loss.triplet_weight))


def resolved_head(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The head's scale and margin as trained: unset ones (None) are the paper's
    (`losses.resolve_head`); {} for a config without a head key."""
    if HEAD_KEY not in flat:
        return {}
    scale, margin = losses.resolve_head(flat[HEAD_KEY], flat.get(SCALE_KEY),
                                        flat.get(MARGIN_KEY))
    return {SCALE_KEY: scale, MARGIN_KEY: margin}


def head_row_collapsed(train_rows: Sequence[Mapping[str, Any]], flat: Mapping[str, Any]
                       ) -> bool | None:
    """The spread-only rule (`collapse.is_spread_collapsed`): a margin-softmax loss has no
    pinned value to compare with."""
    del flat
    return collapse.is_spread_collapsed(train_rows)


_HEAD_TABLE = TableSpec(
    collapsed=head_row_collapsed, leading=(KIND_KEY, HEAD_KEY, SCALE_KEY, MARGIN_KEY),
    metrics=("oneshot_top1",), resolve=resolved_head,
    note=("Classification and combined rows: head, s and m are the margin-softmax head and its "
          "scale and margin as trained (unset keys show the paper's values); the triplet keys "
          "are empty on classification rows; oneshot_top1: one-shot identification top-1 with "
          "one enrolment image per test identity; collapsed: the spread half of the rule alone "
          "(a margin-softmax loss has no pinned value)."))

OBJECTIVES.add("classification", ObjectiveKind(
    build=_build_classification, parts=frozenset({CLASSIFICATION_SETTINGS}),
    has_parameters=True, table=_HEAD_TABLE))
OBJECTIVES.add("combined", ObjectiveKind(
    build=_build_combined,
    parts=frozenset({LOSS_SETTINGS, CLASSIFICATION_SETTINGS, TRIPLET_WEIGHT_KEY}),
    has_parameters=True, table=dataclasses.replace(_HEAD_TABLE, trailing=TRIPLET_TABLE_COLUMNS)))
