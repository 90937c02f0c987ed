"""Triplet mining on rows of the distance matrix: which negative (and positive) each term uses.

Every function here works on *stop-gradient* distances `d` [A,B] (A anchors against all B
candidates) and boolean masks `positive`/`negative` [A,B], and returns *indices* plus validity
masks; `triplet.py` then gathers the differentiable distances at those indices, so gradients
flow only through the chosen d(a,p) and d(a,n). An empty masked row is never resolved to a
silent index 0: every choice comes with a mask saying whether it exists.

Memory stays O(A·B) (O(B²)) for every rule: the rules that depend on each positive's distance
(TF-Addons semi-hard, FaceNet's band) sort each anchor's negative distances once and
binary-search every positive's distance in that row (`jnp.searchsorted`, method "scan":
O(B log B) per anchor, never a B×B comparison per anchor). Semi-hard, by default, takes no
sort (XLA's CPU sort dominates the step at B = 1,800) whenever no anchor has more than a
static cap of positives (`SEMIHARD_POSITIVES_CAP`, or the `max_positives` hint): with at
most 4 positives per anchor, two masked row minima per positive; with more, it buckets each
anchor's negatives by how many of its positives are closer and takes one scatter-min per row.
A batch with more positives falls back to the sort inside the same compiled program, so the
result never depends on the cap.
Random and distance-weighted sampling draw one uniform per (anchor, candidate) pair and look it
up in the anchor's cumulative-weight row (inverse CDF), with no sort at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.losses.distances import euclidean_on_sphere


class SortedNegatives(NamedTuple):
    """Each anchor's negative distances in ascending order.

    values: [A,B] float, the negatives first, then +inf padding.
    columns: [A,B] int32, the candidate column of each sorted entry.
    count: [A] int32, number of negatives of each anchor.
    """
    values: jax.Array
    columns: jax.Array
    count: jax.Array


class PairNegatives(NamedTuple):
    """One negative per (anchor, positive) pair; the positive is the pair's own column.

    column: [A,B] int32 chosen negative's column (meaningless where `has_term` is False).
    has_term: [A,B] bool, the pair is an anchor-positive pair and got a negative.
    semihard_found: [A,B] bool, the pair found a negative inside the rule's semi-hard condition.
    semihard_pairs: [A,B] bool, the pairs `semihard_found` is a fraction of (all False where
        the rule has no semi-hard condition).
    """
    column: jax.Array
    has_term: jax.Array
    semihard_found: jax.Array
    semihard_pairs: jax.Array


class SlotNegatives(NamedTuple):
    """A sort-free path's answer in S slots per anchor (S static, at least its positive count).

    positive_column: [A,S] int32, the slot's positive; B where the slot holds none.
    column: [A,S] int32, the chosen negative (meaningless where the slot holds no positive).
    found: [A,S] bool, a negative strictly farther than the positive exists.
    """
    positive_column: jax.Array
    column: jax.Array
    found: jax.Array


def label_masks(labels: jax.Array, anchor_start: jax.Array | int,
                num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """labels [B] -> (positive, negative) bool [num_anchors, B] for the anchor rows.

    positive: same label, other image (an anchor is never its own positive; duplicates of it
    are). negative: different label.
    """
    anchor_labels = lax.dynamic_slice_in_dim(labels, anchor_start, num_anchors)
    same = anchor_labels[:, None] == labels[None, :]
    is_self = (anchor_start + jnp.arange(num_anchors))[:, None] == jnp.arange(
        labels.shape[0])[None, :]
    return same & ~is_self, ~same


def row_uniforms(key: jax.Array, anchor_start: jax.Array | int, num_anchors: int,
                 num_candidates: int) -> jax.Array:
    """[num_anchors, B] uniforms in [0,1) for the anchor rows.

    Global row r draws from fold_in(key, r), so a row's draw does not depend on how the batch's
    anchors are split across devices (and costs O(rows·B), not B², per device).
    """
    rows = anchor_start + jnp.arange(num_anchors)
    draw = lambda r: jax.random.uniform(jax.random.fold_in(key, r), (num_candidates,))  # noqa: E731
    return jax.vmap(draw)(rows)


def sort_negatives(d: jax.Array, negative: jax.Array) -> SortedNegatives:
    """One row sort per anchor (values and their columns together), [A,B] -> SortedNegatives."""
    keys = jnp.where(negative, d, jnp.inf)
    columns = jnp.broadcast_to(jnp.arange(d.shape[1], dtype=jnp.int32), d.shape)
    # Stable, so tied distances keep column order (the documented tie-breaks) on every
    # backend.
    values, columns = lax.sort((keys, columns), dimension=1, num_keys=1, is_stable=True)
    return SortedNegatives(values, columns, jnp.sum(negative, axis=1, dtype=jnp.int32))


def rank_in_rows(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """Per row, how many sorted entries are < query (side "left") or <= query ("right").

    sorted_rows: [A,B] ascending; queries: [A,Q] -> [A,Q] int32. Binary search ("scan"), so
    O(Q log B) work and O(Q) memory per row.
    """
    search = lambda row, q: jnp.searchsorted(row, q, side=side, method="scan")  # noqa: E731
    return jax.vmap(search)(sorted_rows, queries).astype(jnp.int32)


def _column_at_rank(sorted_negatives: SortedNegatives, rank: jax.Array) -> jax.Array:
    """[A,Q] ranks (clipped into [0, B)) -> [A,Q] candidate columns."""
    rank = jnp.clip(rank, 0, sorted_negatives.columns.shape[1] - 1)
    return jnp.take_along_axis(sorted_negatives.columns, rank, axis=1)


# Semi-hard mining takes its sort-free path while no anchor of the batch has more than this many
# positives (every P×K batch with K ≤ 65); beyond that, one row sort per anchor. Measured on the
# 2-core CPU: see docs/large_batch_mining.md.
SEMIHARD_POSITIVES_CAP = 64

# The sort-free path holds each anchor's positives in a static number of slots: the smallest of
# these that fits the batch (the last is the cap), so a P×K batch with small K pays for few
# slots and one with K = 40 does not fall back to the sort. Few tiers: each is one more
# compiled branch.
_SLOT_TIERS = (4, 16)


def semihard_slot_tiers(max_positives: int | None = None,
                        num_candidates: int | None = None) -> tuple[int, ...]:
    """The static slot counts `mine_semihard` compiles, smallest first; the last is the cap.

    num_candidates (B, static): no anchor has more than B positives, so the cap is at most B
    and the tiers above it are never taken: a small batch compiles fewer branches."""
    cap = SEMIHARD_POSITIVES_CAP if max_positives is None else max_positives
    if num_candidates is not None:
        cap = min(cap, max(num_candidates, 1))
    return tuple(t for t in _SLOT_TIERS if t < cap) + (cap,)


def semihard_sort_reachable(positive: jax.Array, max_positives: int | None = None) -> bool:
    """Whether a batch of positive's shape [A,B] can have an anchor beyond the cap (static):
    only then do `mine_semihard` and the semi-hard loss compile the sort as a branch."""
    cap = SEMIHARD_POSITIVES_CAP if max_positives is None else max_positives
    return positive.shape[1] > cap


def mine_semihard(d: jax.Array, positive: jax.Array, negative: jax.Array,
                  max_positives: int | None = None) -> PairNegatives:
    """TF-Addons `triplet_semihard_loss` rule, per ordered anchor-positive pair (a, p):
    the closest negative with d(a,n) > d(a,p) strictly; if there is none, the farthest
    negative. Pairs whose anchor has no negative at all get no term.

    Ties go to the lowest column for the closest negative and to the highest for the farthest
    (a stable sort's order). The paths pick exactly these triplets, chosen inside the compiled
    program by the batch's largest per-anchor positive count m (traced): while m ≤ the cap
    (`max_positives`, default SEMIHARD_POSITIVES_CAP; static) a sort-free path with the
    smallest slot count ≥ m (`semihard_slot_tiers`), O(A·B·slots) elementwise work and
    O(A·B) memory; otherwise the sort path. So the result never depends on the cap, only
    the speed does.
    """
    branch, by_slots = semihard_paths(d, positive, negative, max_positives)
    paths = [lambda find=find: slots_as_pairs(find(), positive, negative) for find in by_slots]
    if semihard_sort_reachable(positive, max_positives):
        paths.append(lambda: semihard_by_sort(d, positive, negative))
    return lax.switch(branch, paths)


def semihard_paths(d: jax.Array, positive: jax.Array, negative: jax.Array,
                   max_positives: int | None = None
                   ) -> tuple[jax.Array, list[Callable[[], SlotNegatives]]]:
    """The sort-free paths of `mine_semihard` and which one a batch takes.

    Returns (branch, paths): paths[i]() runs the sort-free path with tier i's slot count
    (row minima up to 4 slots, buckets above);
    branch (traced int32) is the tier this batch needs, or len(paths) when an anchor has more
    positives than the cap (the sort). For `lax.switch` over these plus the sort where
    `semihard_sort_reachable` (the tiers stop at B: a batch never needs more slots).
    """
    tiers = semihard_slot_tiers(max_positives, positive.shape[1])
    branch = jnp.searchsorted(jnp.asarray(tiers, jnp.int32), _most_positives(positive),
                              side="left")
    return branch, [functools.partial(_semihard_by_slots(slots), d, positive, negative, slots)
                    for slots in tiers]


def _semihard_by_slots(num_slots: int) -> Callable[..., SlotNegatives]:
    """The sort-free path for this many slots (static): row minima for few, else buckets."""
    return _semihard_by_row_minima if num_slots <= _ROW_MINIMA_SLOTS else _semihard_by_buckets


def slots_as_pairs(chosen: SlotNegatives, positive: jax.Array,
                   negative: jax.Array) -> PairNegatives:
    """A sort-free path's slots written into the [A,B] pair layout of PairNegatives."""
    num_candidates = positive.shape[1]
    column = slot_values_in_rows(chosen.column, chosen.positive_column, num_candidates)
    found = slot_values_in_rows(chosen.found, chosen.positive_column, num_candidates)
    has_term = positive & jnp.any(negative, axis=1, keepdims=True)
    return PairNegatives(column, has_term, has_term & found, has_term)


def slot_values_in_rows(values: jax.Array, positive_column: jax.Array,
                        num_candidates: int) -> jax.Array:
    """values [A,S] -> [A,B]: each slot's value at its positive's column, zero elsewhere.
    Slots without a positive (column B) point past the row and are dropped."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], num_candidates), values.dtype).at[
        rows, positive_column].set(values, mode="drop")


def _most_positives(positive: jax.Array) -> jax.Array:
    """positive [A,B] bool -> the largest positive count of any anchor (int32 scalar)."""
    return jnp.max(jnp.sum(positive, axis=1, dtype=jnp.int32), initial=0)


def semihard_skips_sort(positive: jax.Array, max_positives: int | None = None) -> jax.Array:
    """Whether `mine_semihard` takes its sort-free path on this batch: bool scalar (traced).

    positive: [A,B] bool. True when no anchor has more positives than the cap (`max_positives`,
    default SEMIHARD_POSITIVES_CAP).
    """
    return _most_positives(positive) <= semihard_slot_tiers(max_positives)[-1]


def semihard_by_sort(d: jax.Array, positive: jax.Array, negative: jax.Array) -> PairNegatives:
    """Every column's distance binary-searched in the anchor's sorted negatives."""
    negatives = sort_negatives(d, negative)
    first_farther = rank_in_rows(negatives.values, d, side="right")
    count = negatives.count[:, None]
    found = first_farther < count
    rank = jnp.where(found, first_farther, count - 1)
    has_term = positive & (count > 0)
    return PairNegatives(_column_at_rank(negatives, rank), has_term, has_term & found, has_term)


def _positive_slots(d: jax.Array, positive: jax.Array,
                    num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each anchor's positives in `num_slots` slots, farthest first (top_k).

    d, positive: [A,B] -> (slot_d [A,S] float, +inf where unused; slot_column [A,S] int32;
    used [A,S] bool), S = min(num_slots, B).
    """
    slot_d, slot_column = lax.top_k(jnp.where(positive, d, -jnp.inf),
                                    min(num_slots, d.shape[1]))
    used = slot_d > -jnp.inf
    return jnp.where(used, slot_d, jnp.inf), slot_column, used


def _farthest_negative(d: jax.Array, negative: jax.Array) -> jax.Array:
    """[A,B] -> [A,1] int32: the farthest negative, highest column among ties (two plain row
    maxima: measured 2–3× faster than an argmax, a variadic reduce, on XLA's CPU backend)."""
    far_d = jnp.where(negative, d, -jnp.inf)
    farthest_d = jnp.max(far_d, axis=1, keepdims=True)
    columns = jnp.arange(d.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(far_d == farthest_d, columns, -1), axis=1, keepdims=True)


def _slot_negatives(slot_column: jax.Array, used: jax.Array, closest: jax.Array,
                    closest_d: jax.Array, d: jax.Array, negative: jax.Array) -> SlotNegatives:
    """Each slot's closest farther negative, or the farthest negative where it has none."""
    found = closest_d < jnp.inf
    return SlotNegatives(jnp.where(used, slot_column, d.shape[1]),
                         jnp.where(found, closest, _farthest_negative(d, negative)), found)


# Up to this many slots, `_semihard_by_row_minima` (two masked row minima per slot) beats the
# buckets' two scatters; at 16 slots it is 3× slower (B = 1,024, the 2-core CPU).
_ROW_MINIMA_SLOTS = 4


def _semihard_by_row_minima(d: jax.Array, positive: jax.Array, negative: jax.Array,
                            num_slots: int) -> SlotNegatives:
    """The rule without a sort, for few slots: per slot, the smallest negative distance
    strictly above the slot's positive, then the lowest column holding it. `num_slots`
    (static) must be at least the largest positive count of any anchor.
    Work: 2·slots masked row minima, O(A·B·slots), no scatter.
    """
    # The barrier keeps top_k XLA's TopK call: read slot by slot, its output otherwise turns
    # into a full row sort (XLA 0.10, CPU).
    slot_d, slot_column, used = lax.optimization_barrier(
        _positive_slots(d, positive, num_slots))
    negative_d = jnp.where(negative, d, jnp.inf)
    columns = jnp.arange(d.shape[1], dtype=jnp.int32)
    # One [A,B] pass per slot, each fused into its row minimum (an [A,S,B] form is
    # materialised first).
    closest_d = jnp.stack([jnp.min(jnp.where(negative_d > slot_d[:, s, None], negative_d,
                                             jnp.inf), axis=1)
                           for s in range(slot_d.shape[1])], axis=1)  # [A,S]
    # Every negative at that distance is strictly farther than the positive.
    closest = jnp.stack([jnp.min(jnp.where(negative_d == closest_d[:, s, None], columns,
                                           d.shape[1]), axis=1)
                         for s in range(slot_d.shape[1])], axis=1)
    return _slot_negatives(slot_column, used, closest, closest_d, d, negative)


def _semihard_by_buckets(d: jax.Array, positive: jax.Array, negative: jax.Array,
                         num_slots: int) -> SlotNegatives:
    """The same rule without a sort, for many slots. `num_slots` (static) must be at least the
    largest positive count of any anchor; the caller guarantees it.

    A negative's *bucket* is the number of the anchor's positives strictly closer than it, so
    d(a,n) > d(a,p) exactly when bucket(n) ≥ t(p) = #{positives q: d(a,q) ≤ d(a,p)}. One
    scatter-min per row gives each bucket's closest negative (lowest column among ties: a
    second scatter-min), and a suffix min over buckets answers every positive at once. Buckets
    hold disjoint distance ranges, so the suffix's first minimal bucket holds the rule's lowest
    tied column. Work: O(A·B·slots) fused compares plus two O(A·B) scatters.
    """
    num_anchors, num_candidates = d.shape
    positive_d, slot_column, used = _positive_slots(d, positive, num_slots)
    num_slots = positive_d.shape[1]
    rows = jnp.arange(num_anchors)[:, None]
    columns = jnp.arange(num_candidates, dtype=jnp.int32)
    negative_d = jnp.where(negative, d, jnp.inf)
    # A sum over static slots fuses into one elementwise pass (a reduce over a slot axis would
    # not vectorise on XLA's CPU backend).
    bucket = sum((positive_d[:, s, None] < negative_d).astype(jnp.int32)
                 for s in range(num_slots))  # [A,B] in [0, S]
    bucket_min = jnp.full((num_anchors, num_slots + 1), jnp.inf).at[rows, bucket].min(negative_d)
    # Each negative's own bucket minimum: an [A,B] gather from the [A,S+1] table (4× faster
    # than a select chain over the slots at 64 slots, B = 1,800, on XLA's CPU backend).
    is_bucket_min = negative_d == jnp.take_along_axis(bucket_min, bucket, axis=1)
    bucket_column = jnp.full((num_anchors, num_slots + 1), num_candidates, jnp.int32).at[
        rows, bucket].min(jnp.where(is_bucket_min, columns, num_candidates))
    suffix_min = lax.cummin(bucket_min, axis=1, reverse=True)
    first_minimal = lax.cummin(jnp.where(bucket_min == suffix_min, jnp.arange(num_slots + 1),
                                         num_slots), axis=1, reverse=True)
    # top_k sorts each row's slots by distance, descending, so the positives no farther than
    # slot s are the used slots from the first of s's tie group on: t = used − that index.
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    starts_tie_group = jnp.concatenate(
        [jnp.ones((num_anchors, 1), bool), positive_d[:, 1:] != positive_d[:, :-1]], axis=1)
    tie_group_start = lax.cummax(jnp.where(starts_tie_group, slots, 0), axis=1)
    threshold = jnp.sum(used, axis=1, keepdims=True, dtype=jnp.int32) - tie_group_start
    threshold = jnp.clip(threshold, 0, num_slots)  # unused slots: garbage, never written
    closest_d = jnp.take_along_axis(suffix_min, threshold, axis=1)
    closest = jnp.take_along_axis(bucket_column, jnp.take_along_axis(first_minimal, threshold,
                                                                     axis=1), axis=1)
    return _slot_negatives(slot_column, used, closest, closest_d, d, negative)


def mine_semihard_facenet(d: jax.Array, positive: jax.Array, negative: jax.Array,
                          margin: jax.Array | float, uniform: jax.Array) -> PairNegatives:
    """FaceNet's band, per anchor-positive pair: a uniformly random negative among those with
    d(a,p) < d(a,n) < d(a,p) + margin, picked by `uniform` [A,B] in [0,1). Pairs with no such
    negative get no term.
    """
    negatives = sort_negatives(d, negative)
    band_start = rank_in_rows(negatives.values, d, side="right")
    band_stop = rank_in_rows(negatives.values, d + margin, side="left")
    band_size = jnp.maximum(band_stop - band_start, 0)
    offset = jnp.minimum(jnp.floor(uniform * band_size).astype(jnp.int32), band_size - 1)
    found = positive & (band_size > 0)
    pairs = positive & (negatives.count[:, None] > 0)
    return PairNegatives(_column_at_rank(negatives, band_start + offset), found, found, pairs)


def sample_by_weight(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF sampling of one column per query, P(column j) = w[a,j] / sum_j w[a,j].

    weights: [A,B] ≥ 0; uniform: [A,Q] in [0,1) -> [A,Q] int32 columns, each with positive
    weight whenever the row has any (rows of zeros give a meaningless column; mask them).
    """
    num_columns = weights.shape[1]
    cumulative = jnp.cumsum(weights, axis=1)
    targets = uniform * cumulative[:, -1:]
    # First column whose cumulative weight exceeds the target.
    columns = rank_in_rows(cumulative, targets, side="right")
    # XLA sums long rows in a tree order, so the running total can change (even step down) at
    # a zero-weight column and the search can land on one: move to the next weighted column.
    # A min is exact in any order, unlike the sum.
    column_ids = jnp.arange(num_columns, dtype=jnp.int32)
    next_weighted = lax.cummin(jnp.where(weights > 0, column_ids, num_columns), axis=1,
                               reverse=True)
    columns = jnp.take_along_axis(next_weighted, jnp.minimum(columns, num_columns - 1), axis=1)
    last_weighted = jnp.max(jnp.where(weights > 0, column_ids, 0), axis=1)
    return jnp.minimum(columns, last_weighted[:, None])  # u·total can round up to total


def mine_random(positive: jax.Array, negative: jax.Array, uniform: jax.Array) -> PairNegatives:
    """Per anchor-positive pair, a uniformly random negative (the baseline; distances play no
    part). Pairs whose anchor has no negative get no term.
    """
    has_term = positive & jnp.any(negative, axis=1, keepdims=True)
    columns = sample_by_weight(negative.astype(jnp.float32), uniform)
    no_condition = jnp.zeros_like(has_term)
    return PairNegatives(columns, has_term, no_condition, no_condition)


def distance_weighted_weights(d: jax.Array, negative: jax.Array, *, distance: str,
                              embedding_dim: int, cutoff: float,
                              nonzero_loss_cutoff: float) -> jax.Array:
    """Wu et al. 2017 sampling weights [A,B] (unnormalised; 0 off the negatives).

    On the unit sphere in R^n the density of the distance between two random points is
    q(δ) ∝ δ^(n-2) (1 - δ²/4)^((n-3)/2); each negative is weighted by 1/q(max(δ, cutoff)),
    with δ the Euclidean distance (converted from `distance`, so embeddings must be unit
    vectors), and negatives with δ ≥ nonzero_loss_cutoff get weight 0. Computed in log space,
    scaled so each row's largest weight is 1. An anchor whose negatives all lie beyond
    nonzero_loss_cutoff falls back to uniform weights over its negatives (as Wu et al.'s code).
    """
    delta = euclidean_on_sphere(d, distance)
    clipped = jnp.clip(delta, cutoff, nonzero_loss_cutoff)
    n = embedding_dim
    log_q = ((n - 2.0) * jnp.log(clipped)
             + (n - 3.0) / 2.0 * jnp.log(jnp.maximum(1.0 - clipped**2 / 4.0, 1e-12)))
    eligible = negative & (delta < nonzero_loss_cutoff)
    log_w = jnp.where(eligible, -log_q, -jnp.inf)
    row_max = jnp.max(log_w, axis=1, keepdims=True)
    weights = jnp.where(eligible, jnp.exp(log_w - jnp.where(eligible, row_max, 0.0)), 0.0)
    any_eligible = jnp.any(eligible, axis=1, keepdims=True)
    return jnp.where(any_eligible, weights, negative.astype(weights.dtype))


def mine_distance_weighted(d: jax.Array, positive: jax.Array, negative: jax.Array,
                           uniform: jax.Array, *, distance: str, embedding_dim: int,
                           cutoff: float, nonzero_loss_cutoff: float) -> PairNegatives:
    """Per anchor-positive pair, a negative sampled with probability ∝ the weights of
    `distance_weighted_weights`. Pairs whose anchor has no negative get no term.
    """
    weights = distance_weighted_weights(d, negative, distance=distance,
                                        embedding_dim=embedding_dim, cutoff=cutoff,
                                        nonzero_loss_cutoff=nonzero_loss_cutoff)
    has_term = positive & jnp.any(negative, axis=1, keepdims=True)
    no_condition = jnp.zeros_like(has_term)
    return PairNegatives(sample_by_weight(weights, uniform), has_term, no_condition,
                         no_condition)


def mine_hardest(d: jax.Array, positive: jax.Array,
                 negative: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch-hard (Hermans et al. 2017): per anchor, the farthest positive and the closest
    negative -> (positive column [A], negative column [A], valid [A] = anchor has both).
    Ties go to the lowest column.
    """
    positive_column = jnp.argmax(jnp.where(positive, d, -jnp.inf), axis=1)
    negative_column = jnp.argmin(jnp.where(negative, d, jnp.inf), axis=1)
    valid = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
    return positive_column, negative_column, valid
