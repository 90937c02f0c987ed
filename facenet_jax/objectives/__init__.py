"""What the train step optimises besides the encoder (base.py: the interface).

kinds.py: the OBJECTIVES registry, one entry per config.loss.kind (how to build it, whether it
has parameters, which config keys it reads, how sweep tables show it); triplet.py: the mined
margin loss (with an optional cross-batch memory); classification.py: margin-softmax heads with
class centres sharded over the mesh, and classification + triplet. Each registers its kinds.
"""

from __future__ import annotations

import math
import numbers

import ml_collections

from facenet_jax import losses

from facenet_jax.objectives.base import Objective, Terms, weighted_objective
from facenet_jax.objectives.classification import (CombinedObjective,
                                                   ClassificationObjective)
from facenet_jax.objectives.kinds import (KIND_KEY, OBJECTIVES, ObjectiveKind, TableSpec,
                                          kind_of, kinds_reading, unread_keys)
from facenet_jax.objectives.triplet import MINING_SCOPES, LossSpec, TripletObjective

# config.loss.kind: what a run optimises (the registered kinds, in registration order).
LOSS_KINDS = OBJECTIVES.names()

__all__ = ["KIND_KEY", "LOSS_KINDS", "MINING_SCOPES", "OBJECTIVES", "ClassificationObjective",
           "CombinedObjective", "LossSpec", "Objective", "ObjectiveKind", "TableSpec", "Terms",
           "TripletObjective", "from_config", "has_parameters", "kind_of", "kinds_reading",
           "unread_keys", "validate_objective_config", "weighted_objective"]


def has_parameters(config: ml_collections.ConfigDict) -> bool:
    """Whether `config`'s objective has parameters of its own (class centres)."""
    return kind_of(config).has_parameters


def from_config(config: ml_collections.ConfigDict, *, warmup: bool = False,
                num_classes: int | None = None, num_shards: int = 1) -> Objective:
    """The objective `config` trains (warmup=True: that of the first loss.warmup_steps).

    num_classes (the training split's identities) and num_shards (the mesh size, over which
    class centres are split) are needed by the objectives with class centres."""
    kind = kind_of(config)
    if kind.has_parameters and num_classes is None:
        raise ValueError(f"loss.kind={config.loss.kind!r} needs the number of training classes")
    return kind.build(config, warmup=warmup, num_classes=num_classes, num_shards=num_shards)


def validate_objective_config(loss_config: ml_collections.ConfigDict) -> None:
    """ValueError naming the key and the fix for a bad loss.kind / loss.classification /
    loss.triplet_weight, or a setting the kind does not read turned on (the cross-batch
    memory, a mining warm-up)."""
    kind = OBJECTIVES.get(loss_config.kind, key=KIND_KEY)
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
    if loss_config.memory.size and not kind.reads("loss.memory.size"):
        with_memory = " or ".join(map(repr, kinds_reading("loss.memory.size")))
        raise ValueError(f"loss.memory.size={loss_config.memory.size}: the cross-batch memory "
                         f"is an option of loss.kind {with_memory}; with "
                         f"loss.kind={loss_config.kind!r} set it to 0")
    if loss_config.warmup_steps and not kind.reads("loss.warmup_steps"):
        raise ValueError(f"loss.warmup_steps mines with another triplet strategy first; "
                         f"loss.kind={loss_config.kind!r} mines no triplets: set it to 0")
