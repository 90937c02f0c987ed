"""Brute-force numpy reference for the triplet losses, written independently of the JAX code.

It takes the distance matrix as given (so ties compare exactly as in the code under test) and
enumerates anchor-positive pairs and (a, p, n) triplets with plain loops. Comparisons that use
the margin are done in float32, as `t = d(a,p) + margin` then `d(a,n) < t`, the form the
documented rules state; sums are accumulated in float64.

For the random strategies the reference cannot reproduce the draw: it receives the negative the
code chose for each pair, asserts that the choice obeys the rule, and computes the loss from it.
"""

from __future__ import annotations

import math

import numpy as np


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class _Terms:
    """Accumulates chosen triplets and the reduction's denominator."""

    def __init__(self, margin: float, soft: bool):
        self.margin, self.soft = np.float32(margin), soft
        self.loss_sum = self.count = self.num_triplets = self.num_active = 0.0
        self.d_ap_sum = self.d_an_sum = 0.0
        self.semihard_found = self.semihard_pairs = 0

    def add(self, d_ap: np.float32, d_an: np.float32, *, counted_if_inactive: bool = True):
        threshold = np.float32(d_ap + self.margin)
        active = bool(d_an < threshold)
        loss = _softplus(float(d_ap) - float(d_an)) if self.soft else max(
            float(np.float32(threshold - d_an)), 0.0)
        self.num_triplets += 1
        self.num_active += active
        self.d_ap_sum += float(d_ap)
        self.d_an_sum += float(d_an)
        if active or counted_if_inactive:
            self.loss_sum += loss
            self.count += 1

    def result(self, dist: np.ndarray) -> tuple[float, dict[str, float]]:
        b = dist.shape[0]
        off_diagonal = ~np.eye(b, dtype=bool)
        ratio = lambda n, m: n / m if m else 0.0  # noqa: E731
        stats = {"num_triplets": self.num_triplets, "num_active": self.num_active,
                 "active_fraction": ratio(self.num_active, self.num_triplets),
                 "mean_d_ap": ratio(self.d_ap_sum, self.num_triplets),
                 "mean_d_an": ratio(self.d_an_sum, self.num_triplets),
                 "semihard_found_fraction": ratio(self.semihard_found, self.semihard_pairs),
                 "embedding_spread": ratio(float(dist[off_diagonal].astype(np.float64).sum()),
                                           b * (b - 1))}
        return ratio(self.loss_sum, self.count), stats


def _pairs(labels: np.ndarray):
    """Every ordered anchor-positive pair (a, p), with the anchor's negatives."""
    b = len(labels)
    for a in range(b):
        negatives = [n for n in range(b) if labels[n] != labels[a]]
        for p in range(b):
            if p != a and labels[p] == labels[a]:
                yield a, p, negatives


def distance_weighted_probabilities(dist_row: np.ndarray, negatives: list[int], *,
                                    distance: str, dim: int, cutoff: float,
                                    nonzero_loss_cutoff: float) -> np.ndarray:
    """Wu et al. 2017 sampling probabilities over all B columns for one anchor (float64)."""
    d = dist_row.astype(np.float64)
    delta = {"squared": np.sqrt(np.maximum(d, 0)), "euclidean": d,
             "cosine": np.sqrt(np.maximum(2 * d, 0))}[distance]
    probabilities = np.zeros(len(d))
    eligible = [n for n in negatives if delta[n] < nonzero_loss_cutoff]
    if not eligible:  # uniform fallback over the negatives
        probabilities[negatives] = 1.0 / len(negatives)
        return probabilities
    for n in eligible:
        x = max(delta[n], cutoff)
        log_q = (dim - 2) * math.log(x) + (dim - 3) / 2 * math.log(1 - x * x / 4)
        probabilities[n] = -log_q
    top = max(probabilities[n] for n in eligible)
    for n in eligible:
        probabilities[n] = math.exp(probabilities[n] - top)
    return probabilities / probabilities.sum()


def reference_triplet_loss(dist: np.ndarray, labels: np.ndarray, *, margin: float,
                           strategy: str, soft: bool = False,
                           chosen_negative: np.ndarray | None = None,
                           distance: str = "squared", dim: int = 0, cutoff: float = 0.5,
                           nonzero_loss_cutoff: float = 1.4) -> tuple[float, dict[str, float]]:
    """(loss, stats) of `strategy` on the float32 distance matrix `dist` [B,B].

    chosen_negative [B,B] (column per (a, p)) is required by the random strategies; the
    distance-weighted rule also needs `distance` and `dim` to check eligibility.
    """
    dist = np.asarray(dist, np.float32)
    labels = np.asarray(labels)
    margin32 = np.float32(margin)
    terms = _Terms(margin, soft)
    if strategy == "hardest":
        for a in range(len(labels)):
            positives = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
            negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
            if positives and negatives:
                terms.add(max(dist[a, p] for p in positives),
                          min(dist[a, n] for n in negatives))
        return terms.result(dist)
    if strategy == "all":
        for a, p, negatives in _pairs(labels):
            for n in negatives:
                terms.add(dist[a, p], dist[a, n], counted_if_inactive=soft)
        return terms.result(dist)
    for a, p, negatives in _pairs(labels):
        if not negatives:
            continue
        d_ap = dist[a, p]
        if strategy == "semihard":
            terms.semihard_pairs += 1
            farther = [dist[a, n] for n in negatives if dist[a, n] > d_ap]
            terms.semihard_found += bool(farther)
            terms.add(d_ap, min(farther) if farther else max(dist[a, n] for n in negatives))
            continue
        n = int(chosen_negative[a, p])
        if strategy == "semihard_facenet":
            terms.semihard_pairs += 1
            upper = np.float32(d_ap + margin32)
            band = [m for m in negatives if d_ap < dist[a, m] < upper]
            if band:
                assert n in band, f"pair {(a, p)}: negative {n} outside the band"
                terms.semihard_found += 1
                terms.add(d_ap, dist[a, n])
        elif strategy == "random":
            assert n in negatives, f"pair {(a, p)}: {n} is not a negative"
            terms.add(d_ap, dist[a, n])
        elif strategy == "distance_weighted":
            probabilities = distance_weighted_probabilities(
                dist[a], negatives, distance=distance, dim=dim, cutoff=cutoff,
                nonzero_loss_cutoff=nonzero_loss_cutoff)
            assert probabilities[n] > 0, f"pair {(a, p)}: {n} has sampling probability 0"
            terms.add(d_ap, dist[a, n])
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
    return terms.result(dist)


def tfa_semihard_loss(dist: np.ndarray, labels: np.ndarray, margin: float) -> float:
    """numpy transcription of TF-Addons 0.23 `triplet_semihard_loss` after its distance step.

    Same tiled B²×B formulation (masked minimum / maximum via the row min/max shifts). Valid
    (and only compared) on batches where every anchor has a positive and a negative.
    """
    dist = np.asarray(dist, np.float64)
    b = len(labels)
    adjacency = labels[:, None] == labels[None, :]
    adjacency_not = ~adjacency
    dist_tile = np.tile(dist, (b, 1))                                   # [B², B]
    mask = np.tile(adjacency_not, (b, 1)) & (dist_tile > dist.T.reshape(-1, 1))
    mask_final = (mask.sum(axis=1, keepdims=True) > 0).reshape(b, b).T

    def masked_minimum(data, m):
        axis_maximums = data.max(axis=1, keepdims=True)
        return ((data - axis_maximums) * m).min(axis=1, keepdims=True) + axis_maximums

    def masked_maximum(data, m):
        axis_minimums = data.min(axis=1, keepdims=True)
        return ((data - axis_minimums) * m).max(axis=1, keepdims=True) + axis_minimums

    negatives_outside = masked_minimum(dist_tile, mask).reshape(b, b).T
    negatives_inside = np.tile(masked_maximum(dist, adjacency_not), (1, b))
    semi_hard_negatives = np.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + dist - semi_hard_negatives
    mask_positives = adjacency.astype(np.float64) - np.eye(b)
    return float(np.maximum(loss_mat * mask_positives, 0.0).sum() / mask_positives.sum())
