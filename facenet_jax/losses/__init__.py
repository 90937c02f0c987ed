"""Triplet losses with on-device mining (pure, jittable JAX).

distances.py: pairwise distances; mining.py: which triplets each strategy picks (indices, under
stop_gradient); triplet.py: the losses, their additive per-device sums and the argument checks.
"""

from facenet_jax.losses.distances import (DISTANCES, pairwise_distances,
                                          pairwise_distances_between)
from facenet_jax.losses.triplet import (MINING_STRATEGIES, STATS_KEYS, STRATEGIES,
                                        STRATEGY_OPTIONS, SUM_KEYS, MiningInputs, Strategy,
                                        TripletSums, reduce_triplet_sums, triplet_loss,
                                        triplet_loss_sums, validate_loss_args)

__all__ = ["DISTANCES", "MINING_STRATEGIES", "MiningInputs", "STATS_KEYS", "STRATEGIES",
           "STRATEGY_OPTIONS", "SUM_KEYS", "Strategy", "TripletSums", "pairwise_distances",
           "pairwise_distances_between",
           "reduce_triplet_sums", "triplet_loss", "triplet_loss_sums", "validate_loss_args"]
