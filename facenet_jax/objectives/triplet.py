"""The triplet objective: the margin loss of triplets mined on the device (FaceNet), with an
optional cross-batch memory (losses/memory.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from facenet_jax import collapse, losses
from facenet_jax.losses import memory as xbm
from facenet_jax.objectives.base import Terms
from facenet_jax.objectives.kinds import (LOSS_SETTINGS, MEMORY_SETTINGS, OBJECTIVES,
                                          ObjectiveKind, TableSpec)
from facenet_jax.parallel import AXIS

# config.parallel.mining: triplets mined over the global batch or inside each device's shard.
MINING_SCOPES = ("global", "local")
# The metrics of the batch's own triplet loss, in the training log's order.
TRIPLET_STATS = ("loss", "active_fraction", "mean_d_ap", "mean_d_an", "num_triplets",
                 "num_active", "semihard_found_fraction", "embedding_spread")
MEMORY_STATS = ("memory_loss", "memory_active_fraction", "memory_fill")
# A triplet row of a sweep table always shows α with its distance (and the strategy): α means
# nothing without its distance.
TRIPLET_TABLE_COLUMNS = ("loss.margin", "loss.distance", "loss.strategy")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The triplet loss settings, hashable so they can be static arguments of the compiled
    step."""

    strategy: str
    margin: float
    distance: str
    soft: bool
    options: tuple[tuple[str, Any], ...] = ()
    memory: xbm.MemorySpec | None = None  # cross-batch memory; None: off

    @classmethod
    def from_config(cls, loss_config: ml_collections.ConfigDict, *,
                    warmup: bool = False) -> "LossSpec":
        """The step's loss from `config.loss`; warmup=True: the loss of the first
        loss.warmup_steps steps, loss.warmup_strategy with its default options (loss.options
        belong to loss.strategy). Semi-hard needs no max_positives hint: it takes its sort-free
        path by itself for P×K batches (mining.semihard_skips_sort), and a K − 1 hint would
        send the cross-batch memory's loss, whose anchors have many positives, to the sort."""
        strategy = loss_config.warmup_strategy if warmup else loss_config.strategy
        options = {} if warmup else dict(loss_config.options)
        return cls(strategy=strategy, margin=float(loss_config.margin),
                   distance=loss_config.distance, soft=bool(loss_config.soft),
                   options=tuple(sorted(options.items())),
                   memory=xbm.MemorySpec.from_config(loss_config))

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `losses.triplet_loss_sums` these settings stand for."""
        return dict(margin=self.margin, strategy=self.strategy, distance=self.distance,
                    soft=self.soft, **dict(self.options))


@dataclasses.dataclass(frozen=True)
class TripletObjective:
    """`loss` mined per `mining` scope: "global" mines each device's b anchors against the
    all-gathered global batch (the one-device result on any mesh), "local" within each
    device's shard (each with its own key). With `loss.memory`, the same anchors are also mined
    against the memory (weight × that loss added), and the global batch is enqueued after the
    step from memory.start_step on (over global arrays: the memory stays replicated)."""

    loss: LossSpec
    mining: str = "global"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *,
                    warmup: bool = False) -> "TripletObjective":
        return cls(LossSpec.from_config(config.loss, warmup=warmup),
                   mining=config.parallel.mining)

    @property
    def stats_keys(self) -> tuple[str, ...]:
        return TRIPLET_STATS + (MEMORY_STATS if self.loss.memory is not None else ())

    progress_fields = (("active", "active_fraction", ".3f"),
                       ("spread", "embedding_spread", ".4f"))

    @property
    def term_weights(self) -> Mapping[str, float]:
        memory = self.loss.memory
        return {"triplet": 1.0, **({"memory": memory.weight} if memory is not None else {})}

    def init(self, key: jax.Array, embedding_dim: int) -> Any:
        return {}

    def param_specs(self) -> Any:
        return {}

    def init_extra(self, embedding_dim: int) -> xbm.CrossBatchMemory | None:
        memory = self.loss.memory
        return None if memory is None else xbm.init_memory(memory.size, embedding_dim)

    def _candidates(self, embeddings: jax.Array, labels: jax.Array, key: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array | int, jax.Array]:
        """(candidates, their labels, the first anchor's row among them, the mining key)."""
        device = lax.axis_index(AXIS)
        if self.mining == "global":
            return (lax.all_gather(embeddings, AXIS, tiled=True),
                    lax.all_gather(labels, AXIS, tiled=True), device * embeddings.shape[0], key)
        return embeddings, labels, 0, jax.random.fold_in(key, device)

    def sums(self, params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
             key: jax.Array) -> Terms:
        del params  # no parameters of its own
        candidates, candidate_labels, anchor_start, mining_key = self._candidates(
            embeddings, labels, key)
        b = embeddings.shape[0]
        kwargs = self.loss.loss_kwargs()
        terms = {"triplet": losses.triplet_loss_sums(
            candidates, candidate_labels, anchor_start=anchor_start, num_anchors=b,
            key=mining_key, **kwargs)}
        if self.loss.memory is not None:
            terms["memory"] = xbm.memory_loss_sums(
                candidates, candidate_labels, extra, anchor_start=anchor_start,
                num_anchors=b, key=jax.random.fold_in(mining_key, 1), **kwargs)
        return terms

    def reduce(self, terms: Terms, extra: Any) -> dict[str, jax.Array]:
        loss, stats = losses.reduce_triplet_sums(terms["triplet"])
        metrics = {"loss": loss, **stats}
        if self.loss.memory is not None:
            memory_loss, memory_stats = losses.reduce_triplet_sums(terms["memory"])
            metrics.update(memory_loss=memory_loss,
                           memory_active_fraction=memory_stats["active_fraction"],
                           memory_fill=jnp.mean(extra.valid.astype(jnp.float32)))
        return metrics

    def update(self, extra: Any, embeddings: jax.Array, labels: jax.Array,
               step: jax.Array) -> Any:
        if self.loss.memory is None:
            return extra
        return xbm.enqueue_from(extra, embeddings, labels, step, self.loss.memory.start_step)

    def collapse_warning(self, rows: list[Mapping[str, float]], step: int) -> str | None:
        return collapse.collapse_warning(rows, step=step, margin=self.loss.margin,
                                         distance=self.loss.distance, soft=self.loss.soft)


def _build(config: ml_collections.ConfigDict, *, warmup: bool = False,
           num_classes: int | None = None, num_shards: int = 1) -> TripletObjective:
    del num_classes, num_shards  # no class centres
    return TripletObjective.from_config(config, warmup=warmup)


def triplet_row_collapsed(train_rows: Sequence[Mapping[str, Any]], flat: Mapping[str, Any]
                          ) -> bool | None:
    """A finished triplet run's collapse flag: `collapse.is_collapsed` with the row's α,
    distance and soft margin (flattened config `flat`)."""
    return collapse.is_collapsed(train_rows, margin=flat.get("loss.margin", 0.0),
                                 distance=flat.get("loss.distance", "squared"),
                                 soft=bool(flat.get("loss.soft")))


OBJECTIVES.add("triplet", ObjectiveKind(
    build=_build, parts=frozenset({LOSS_SETTINGS, MEMORY_SETTINGS}), has_parameters=False,
    table=TableSpec(collapsed=triplet_row_collapsed, trailing=TRIPLET_TABLE_COLUMNS)))
