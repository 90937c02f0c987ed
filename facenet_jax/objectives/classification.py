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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import collapse, losses
from facenet_jax.objectives.base import Terms
from facenet_jax.objectives.triplet import TRIPLET_STATS, TripletObjective
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
    def shard_size(self) -> int:
        """Classes per device (C rounded up to a multiple of num_shards, then split)."""
        return math.ceil(self.num_classes / self.num_shards)

    def init(self, key: jax.Array, embedding_dim: int) -> dict[str, jax.Array]:
        """centres: [C_padded, D] ~ N(0, CENTRE_INIT_STD²); bias (softmax head): zeros."""
        padded = self.shard_size * self.num_shards
        params = {"centres": CENTRE_INIT_STD * jax.random.normal(key, (padded, embedding_dim),
                                                                 jnp.float32)}
        if self.head == "softmax":
            params["bias"] = jnp.zeros((padded,), jnp.float32)
        return params

    def param_specs(self) -> dict[str, P]:
        specs = {"centres": P(AXIS)}
        if self.head == "softmax":
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
