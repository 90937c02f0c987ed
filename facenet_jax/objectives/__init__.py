"""What the train step optimises besides the encoder (base.py: the interface).

triplet.py: the mined margin loss (with an optional cross-batch memory).
"""

from facenet_jax.objectives.base import Objective, Terms, weighted_objective
from facenet_jax.objectives.triplet import (MINING_SCOPES, LossSpec, TripletObjective)

__all__ = ["MINING_SCOPES", "LossSpec", "Objective", "Terms", "TripletObjective",
           "from_config", "weighted_objective"]


def from_config(config, *, warmup: bool = False) -> Objective:
    """The objective `config` trains (warmup=True: that of the first loss.warmup_steps)."""
    return TripletObjective.from_config(config, warmup=warmup)
