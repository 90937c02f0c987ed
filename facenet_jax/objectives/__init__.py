"""What the train step optimises besides the encoder (base.py: the interface).

triplet.py: the mined margin loss (with an optional cross-batch memory); classification.py:
margin-softmax heads with class centres sharded over the mesh, and classification + triplet.
"""

from __future__ import annotations

import math
import numbers

import ml_collections

from facenet_jax import losses

from facenet_jax.objectives.base import Objective, Terms, weighted_objective
from facenet_jax.objectives.classification import (CombinedObjective,
                                                   ClassificationObjective)
from facenet_jax.objectives.triplet import MINING_SCOPES, LossSpec, TripletObjective

# config.loss.kind: what a run optimises.
LOSS_KINDS = ("triplet", "classification", "combined")

__all__ = ["LOSS_KINDS", "MINING_SCOPES", "ClassificationObjective", "CombinedObjective",
           "LossSpec", "Objective", "Terms", "TripletObjective", "from_config",
           "has_parameters", "validate_objective_config", "weighted_objective"]


def has_parameters(config: ml_collections.ConfigDict) -> bool:
    """Whether `config`'s objective has parameters of its own (class centres)."""
    return config.loss.kind != "triplet"


def from_config(config: ml_collections.ConfigDict, *, warmup: bool = False,
                num_classes: int | None = None, num_shards: int = 1) -> Objective:
    """The objective `config` trains (warmup=True: that of the first loss.warmup_steps).

    num_classes (the training split's identities) and num_shards (the mesh size, over which
    class centres are split) are needed by the objectives with class centres."""
    kind = config.loss.kind
    if kind == "triplet":
        return TripletObjective.from_config(config, warmup=warmup)
    if num_classes is None:
        raise ValueError(f"loss.kind={kind!r} needs the number of training classes")
    classification = ClassificationObjective.from_config(config, num_classes=num_classes,
                                                         num_shards=num_shards)
    if kind == "classification":
        return classification
    return CombinedObjective(classification, TripletObjective.from_config(config, warmup=warmup),
                             triplet_weight=float(config.loss.triplet_weight))


def validate_objective_config(loss_config: ml_collections.ConfigDict) -> None:
    """ValueError naming the key and the fix for a bad loss.kind / loss.classification /
    loss.triplet_weight, or a combination the objectives do not support."""
    kind = loss_config.kind
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss.kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    # Checked whatever the kind: a run records them, and a typo should not wait for the day
    # the kind changes.
    settings = loss_config.classification
    try:
        losses.validate_classification_args(settings.head, settings.scale, settings.margin)
        losses.validate_partial_fc_args(1, settings.sample_fraction)
    except ValueError as error:
        raise ValueError(f"config.loss.classification: {error}") from None
    weight = loss_config.triplet_weight
    if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight) or weight < 0):
        raise ValueError(f"loss.triplet_weight must be a finite number >= 0, got {weight!r}")
    if kind == "triplet":
        return
    if loss_config.memory.size:
        raise ValueError(f"loss.memory.size={loss_config.memory.size}: the cross-batch memory "
                         f"is a triplet-loss option; with loss.kind={kind!r} set it to 0")
    if kind == "classification" and loss_config.warmup_steps:
        raise ValueError("loss.warmup_steps mines with another triplet strategy first; "
                         "loss.kind='classification' has no triplets: set it to 0")
