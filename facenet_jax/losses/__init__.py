"""Triplet losses with on-device mining, and margin-softmax classification losses (pure, jittable
JAX).

distances.py: pairwise distances; mining.py: which triplets each strategy picks (indices, under
stop_gradient); triplet.py: the losses, their additive per-device sums and the argument checks;
classification.py: the registry of heads (softmax, and NormFace / CosFace / ArcFace as one
combined margin formula), the cross-entropy with class centres sharded over a mesh axis, and
Partial FC's class sample.
"""

from facenet_jax.losses.classification import (CLASSIFICATION_HEADS, CLASSIFICATION_SUM_KEYS,
                                               DEFAULT_MARGIN, DEFAULT_SCALE, HEADS,
                                               LinearHead, MarginHead, class_logits,
                                               classification_loss, classification_loss_sums,
                                               combined_margin,
                                               partial_fc_mask, partial_fc_num_active,
                                               reduce_classification_sums, resolve_head,
                                               softmax_cross_entropy_sums,
                                               validate_classification_args,
                                               validate_partial_fc_args)
from facenet_jax.losses.distances import (DISTANCES, pairwise_distances,
                                          pairwise_distances_between)
from facenet_jax.losses.triplet import (MINING_STRATEGIES, STATS_KEYS, STRATEGIES,
                                        STRATEGY_OPTIONS, SUM_KEYS, MiningInputs, Strategy,
                                        TripletSums, auto_anchor_chunk, reduce_triplet_sums,
                                        triplet_loss,
                                        triplet_loss_sums, validate_loss_args)

__all__ = ["CLASSIFICATION_HEADS", "CLASSIFICATION_SUM_KEYS", "DEFAULT_MARGIN", "DEFAULT_SCALE",
           "DISTANCES", "HEADS", "LinearHead", "MINING_STRATEGIES", "MarginHead", "MiningInputs",
           "STATS_KEYS", "STRATEGIES",
           "STRATEGY_OPTIONS", "SUM_KEYS", "Strategy", "TripletSums", "auto_anchor_chunk",
           "class_logits",
           "classification_loss", "classification_loss_sums", "combined_margin",
           "pairwise_distances",
           "pairwise_distances_between", "partial_fc_mask", "partial_fc_num_active",
           "reduce_classification_sums", "reduce_triplet_sums", "resolve_head",
           "softmax_cross_entropy_sums", "triplet_loss", "triplet_loss_sums",
           "validate_classification_args", "validate_loss_args",
           "validate_partial_fc_args"]
