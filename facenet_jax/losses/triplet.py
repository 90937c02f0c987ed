"""Triplet margin losses with on-device mining, as additive sums that split across devices.

A term's loss is the hinge max(d(a,p) + margin - d(a,n), 0), or with soft=True
softplus(d(a,p) - d(a,n)) (Hermans et al. 2017) for every strategy. A term is *active* when
d(a,n) < d(a,p) + margin (for the hinge: exactly when its loss is positive; for soft, the same
margin test, since softplus is never 0).

Strategies (the exact rule and the reduction each one's loss is the mean over):

- "semihard": TF-Addons `triplet_semihard_loss`. Per ordered anchor-positive pair, the closest
  negative strictly farther than the positive, else the farthest negative; mean over all
  anchor-positive pairs whose anchor has a negative (zero-loss pairs included). Mined without
  a sort while no anchor has more than `mining.SEMIHARD_POSITIVES_CAP` positives, with the
  sort beyond (same triplets either way); option `max_positives` (None, or e.g. K − 1 for a
  P×K batch) replaces that cap.
- "semihard_facenet": per anchor-positive pair, a uniformly random negative with
  d(a,p) < d(a,n) < d(a,p) + margin (needs `key`); mean over the pairs that found one.
- "hardest": batch-hard; per anchor, farthest positive and closest negative; mean over anchors
  that have both.
- "all": batch-all; every (a, p, n); hinge: mean over the active triplets; soft: mean over all
  valid triplets (every softplus term is positive).
- "random": per anchor-positive pair, a uniformly random negative (needs `key`); mean over pairs
  whose anchor has a negative.
- "distance_weighted": Wu et al. 2017; per anchor-positive pair, a negative sampled ∝ 1/q(δ)
  (see `mining.distance_weighted_weights`; options `cutoff`, `nonzero_loss_cutoff`; needs
  `key`); mean over pairs whose anchor has a negative.

`num_triplets` counts the chosen terms (triplets for "all", anchors for "hardest", pairs for the
others); `mean_d_ap`/`mean_d_an` average over them. A batch with no term has loss 0 with zero
gradients, and every stat is 0 rather than NaN.

Random draws: anchor row r (its position in the *global* batch) draws its B uniforms from
`fold_in(key, r)`, so a batch gives the same triplets however its anchors are split.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.losses import mining
from facenet_jax.losses.distances import anchor_distance_rows, check_distance
from facenet_jax.registry import Registry

SUM_KEYS = ("loss_sum", "count", "num_triplets", "num_active", "d_ap_sum", "d_an_sum",
            "semihard_found", "semihard_pairs", "spread_sum", "spread_count")
STATS_KEYS = ("num_triplets", "num_active", "active_fraction", "mean_d_ap", "mean_d_an",
              "semihard_found_fraction", "embedding_spread")

# With anchor_chunk=None on the CPU, anchors are mined in blocks of at most this many
# [anchor, candidate] entries (2 MB per [block, B] float32 array): a block's arrays stay in
# cache, and the program's scratch memory under glibc's 32 MB ceiling for reusing freed
# memory, so a call does not page-fault fresh buffers (on the 2-core CPU that halved the time
# at B = 1,024; see docs/large_batch_mining.md). Every batch up to 724 runs in one block.
AUTO_CHUNK_ELEMENTS = 1 << 19
# On GPUs and TPUs blocks only bound memory (64 MB per float32 array; every batch up to 4,096
# in one block, as before the CPU's small blocks): blocks run one after the other, and small
# ones would leave an accelerator waiting on kernel launches. Not yet measured on one.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24

# Soft batch-all has no closed form, so it loops over anchor chunks holding at most about this
# many elements per [chunk, B, B] intermediate.
_SOFT_ALL_CHUNK_ELEMENTS = 1 << 22

TripletSums = dict[str, jax.Array]


class MiningInputs(NamedTuple):
    """What a strategy mines a block of A anchors from, against B candidates.

    d: [A,B] distances (under stop_gradient); positive, negative: [A,B] bool label masks
    (anchor-positive pairs, anchor-negative pairs); margin; uniform: [A,B] draws in [0,1) for
    a strategy that `needs_key` (None otherwise); distance: its name; embedding_dim: D.
    """

    d: jax.Array
    positive: jax.Array
    negative: jax.Array
    margin: Any
    uniform: jax.Array | None
    distance: str
    embedding_dim: int


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A mining strategy, registered by name in MINING_STRATEGIES.

    pairs(inputs, **settings) -> mining.PairNegatives: the negative of each anchor-positive
    pair that gets a term (None for a strategy whose terms are not one negative per pair, e.g.
    batch-all's every triplet). The loss is the mean over those terms, unless
    block_sums(d, positive, negative, margin, soft, **settings) -> TripletSums gives the
    strategy's own (d differentiable, [A,B]). options: option name -> default
    (`config.loss.options`); check(settings) -> settings: validates and normalises them; needs_key: it samples.
    """

    pairs: Callable[..., mining.PairNegatives] | None
    block_sums: Callable[..., TripletSums] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    needs_key: bool = False


MINING_STRATEGIES: Registry[Strategy] = Registry("strategy", valid="valid strategies")


def validate_loss_args(*, margin: Any, strategy: str, distance: str, soft: bool,
                       strategy_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pure-Python checks, no JAX work: ValueError naming the problem and the valid choices.
    Returns the strategy's settings: its options with their defaults filled in.

    margin == 0 without soft is allowed with a warning: it admits the collapsed embedding.
    A traced margin (e.g. under vmap over margins) skips the value checks.
    """
    spec = MINING_STRATEGIES.get(strategy)
    check_distance(distance)
    if not isinstance(soft, bool):
        raise ValueError(f"soft must be True or False, got {soft!r}")
    if isinstance(margin, numbers.Real):
        if not math.isfinite(margin) or margin < 0:
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        if margin == 0 and not soft:
            warnings.warn("margin == 0 with the hinge loss admits the collapsed embedding "
                          "(all points equal, zero loss); use margin > 0 unless that is the "
                          "point", stacklevel=2)
    options = strategy_options or {}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) if spec.options else "none"
        raise ValueError(f"unknown option(s) {unknown} for strategy {strategy!r}; "
                         f"valid options: {valid}")
    settings = {**spec.options, **options}
    return spec.check(settings) if spec.check else settings


def _semihard_settings(settings: dict[str, Any]) -> dict[str, Any]:
    bound = settings["max_positives"]
    if bound is not None:
        if isinstance(bound, bool) or not isinstance(bound, numbers.Integral) or bound < 1:
            raise ValueError(f"semihard max_positives must be None or an int >= 1 (a P×K "
                             f"batch: K - 1), got {bound!r}")
        settings["max_positives"] = int(bound)
    return settings


def _distance_weighted_settings(settings: dict[str, Any]) -> dict[str, Any]:
    cutoff, nonzero = settings["cutoff"], settings["nonzero_loss_cutoff"]
    if not 0 < cutoff < nonzero:
        raise ValueError("distance_weighted needs 0 < cutoff < nonzero_loss_cutoff "
                         f"(Euclidean distances on the unit sphere, at most 2); got "
                         f"cutoff={cutoff}, nonzero_loss_cutoff={nonzero}")
    return settings


def _term_sums(d_ap: jax.Array, d_an: jax.Array, has_term: jax.Array, margin: Any,
               soft: bool) -> TripletSums:
    """Sums over the terms where has_term (any common shape); count = number of terms."""
    threshold = d_ap + margin
    loss = jax.nn.softplus(d_ap - d_an) if soft else jnp.maximum(threshold - d_an, 0.0)
    active = has_term & (d_an < threshold)
    num_terms = jnp.sum(has_term, dtype=jnp.float32)
    stats = {"num_triplets": num_terms, "count": num_terms,
             "num_active": jnp.sum(active, dtype=jnp.float32),
             "d_ap_sum": jnp.sum(jnp.where(has_term, d_ap, 0.0)),
             "d_an_sum": jnp.sum(jnp.where(has_term, d_an, 0.0))}
    return {"loss_sum": jnp.sum(jnp.where(has_term, loss, 0.0)),
            **jax.tree.map(lax.stop_gradient, stats)}


def _pair_sums(d: jax.Array, chosen: mining.PairNegatives, margin: Any, soft: bool,
               d_an: jax.Array | None = None) -> TripletSums:
    """Terms (a, p = column, n = chosen.column[a, p]) gathered from the differentiable d.
    d_an [A,B]: those d(a,n), when the caller has them (only where has_term is read)."""
    if d_an is None:
        d_an = jnp.take_along_axis(d, chosen.column, axis=1)
    return {**_term_sums(d, d_an, chosen.has_term, margin, soft),
            "semihard_found": jnp.sum(chosen.semihard_found, dtype=jnp.float32),
            "semihard_pairs": jnp.sum(chosen.semihard_pairs, dtype=jnp.float32)}


def _term_weights(d_ap: jax.Array, d_an: jax.Array, has_term: jax.Array, margin: Any,
                  soft: bool) -> jax.Array:
    """∂loss/∂d(a,p) of each term (= −∂loss/∂d(a,n)); 0 where there is no term."""
    weight = (jax.nn.sigmoid(d_ap - d_an) if soft
              else (d_an < d_ap + margin).astype(d_ap.dtype))
    return jnp.where(has_term, weight, 0.0)


def _fixed_pair_sums(d: jax.Array, positive_column: jax.Array | None,
                     negative_column: jax.Array, has_term: jax.Array, found: jax.Array,
                     margin: Any, soft: bool) -> tuple[TripletSums, jax.Array, jax.Array]:
    """`_pair_sums` on fixed distances, with the gradient it would have.

    d: [A,B] (stop-gradient); terms (a, positive_column[a,t], negative_column[a,t]) in any
    term layout [A,T], or positive_column None for the pair layout (T = B, the positive is
    the term's own column). Returns (sums, ∂loss_sum/∂d [A,B], ∂loss_sum/∂margin).
    """
    num_anchors, num_candidates = d.shape
    d_ap = d if positive_column is None else jnp.take_along_axis(
        d, jnp.minimum(positive_column, num_candidates - 1), axis=1)
    d_an = jnp.take_along_axis(d, negative_column, axis=1)
    weight = _term_weights(d_ap, d_an, has_term, margin, soft)
    # Scatters into the flattened [A·B]: one index per update, not a (row, column) pair. A
    # column is never both a positive and a negative of an anchor, so the two parts add apart.
    row_offset = num_candidates * jnp.arange(num_anchors, dtype=jnp.int32)[:, None]
    d_cotangent = jnp.zeros(num_anchors * num_candidates, d.dtype).at[
        (row_offset + negative_column).ravel()].add(-weight.ravel())
    if positive_column is None:
        d_cotangent = d_cotangent.reshape(d.shape) + weight
    else:
        d_cotangent = d_cotangent.at[(row_offset + positive_column).ravel()].add(
            weight.ravel(), mode="drop").reshape(d.shape)
    sums = {**_term_sums(d_ap, d_an, has_term, margin, soft),
            "semihard_found": jnp.sum(has_term & found, dtype=jnp.float32),
            "semihard_pairs": jnp.sum(has_term, dtype=jnp.float32)}
    margin_cotangent = jnp.zeros((), d.dtype) if soft else jnp.sum(weight)
    return sums, d_cotangent, margin_cotangent


def _with_gradient(value: jax.Array, wrt: Any, cotangent: jax.Array) -> jax.Array:
    """`value` (fixed) whose first derivative with respect to `wrt` is `cotangent`: adds
    sum(cotangent · (wrt − stop_gradient(wrt))), exactly 0 in the forward pass."""
    return value + jnp.sum(cotangent * (wrt - lax.stop_gradient(wrt)))


def _semihard_sums(d: jax.Array, positive: jax.Array, negative: jax.Array, margin: Any,
                   soft: bool, max_positives: int | None = None) -> TripletSums:
    """`_pair_sums` of `mining.mine_semihard`'s triplets, the same values and gradient.

    Each path sums its terms in its own layout, on stop-gradient distances: the sort-free
    paths in their [A,S] slots (no [A,B] pair arrays: on the 2-core CPU they, and the page
    faults of their buffers, cost as much as the mining at B = 1,024), the sort in the [A,B]
    pair layout; each returns ∂loss_sum/∂d beside its sums, and `_with_gradient` carries it
    back to d outside the switch. Derivatives are exact to first order (the hinge is piecewise
    linear in d; for soft, second derivatives are not propagated).
    """
    d_fixed, margin_fixed = lax.stop_gradient(d), lax.stop_gradient(margin)
    branch, by_slots = mining.semihard_paths(d_fixed, positive, negative, max_positives)
    has_negative = jnp.any(negative, axis=1, keepdims=True)
    Sums = tuple[TripletSums, jax.Array, jax.Array]

    def from_slots(find: Callable[[], mining.SlotNegatives]) -> Callable[[], Sums]:
        def slot_sums() -> Sums:
            chosen = find()
            has_term = (chosen.positive_column < d.shape[1]) & has_negative
            return _fixed_pair_sums(d_fixed, chosen.positive_column, chosen.column, has_term,
                                    chosen.found, margin_fixed, soft)
        return slot_sums

    def by_sort() -> Sums:
        chosen = mining.semihard_by_sort(d_fixed, positive, negative)
        return _fixed_pair_sums(d_fixed, None, chosen.column, chosen.has_term,
                                chosen.semihard_found, margin_fixed, soft)

    paths = [from_slots(find) for find in by_slots]
    if mining.semihard_sort_reachable(positive, max_positives):
        paths.append(by_sort)
    sums, d_cotangent, margin_cotangent = lax.switch(branch, paths)
    loss_sum = _with_gradient(sums["loss_sum"], d, d_cotangent)
    return {**sums, "loss_sum": _with_gradient(loss_sum, margin, margin_cotangent)}


def _hardest_sums(d: jax.Array, positive: jax.Array, negative: jax.Array, margin: Any,
                  soft: bool) -> TripletSums:
    positive_column, negative_column, valid = mining.mine_hardest(
        lax.stop_gradient(d), positive, negative)
    d_ap = jnp.take_along_axis(d, positive_column[:, None], axis=1)[:, 0]
    d_an = jnp.take_along_axis(d, negative_column[:, None], axis=1)[:, 0]
    return _term_sums(d_ap, d_an, valid, margin, soft)


def _hardest_pairs(inputs: MiningInputs) -> mining.PairNegatives:
    """Batch-hard as pair terms: the pair (a, its farthest positive) of each anchor that has
    both, with its closest negative."""
    positive_column, negative_column, valid = mining.mine_hardest(
        inputs.d, inputs.positive, inputs.negative)
    columns = jnp.arange(inputs.d.shape[1])[None, :]
    has_term = valid[:, None] & (columns == positive_column[:, None])
    no_semihard = jnp.zeros(inputs.d.shape, bool)
    return mining.PairNegatives(jnp.broadcast_to(negative_column[:, None], inputs.d.shape),
                                has_term, no_semihard, no_semihard)


def _batch_all_hinge_sums(d: jax.Array, positive: jax.Array, negative: jax.Array,
                          margin: Any) -> TripletSums:
    """Batch-all hinge in O(B²) memory and O(B² log B) time, without enumerating triplets.

    For pair (a,p) with t = d(a,p) + margin, the active negatives are those with d(a,n) < t:
    the first k of the anchor's sorted negatives, k found by binary search; their loss is
    k·t - (sum of those k distances), a prefix sum of the sorted (gathered, differentiable)
    distances.
    """
    negatives = mining.sort_negatives(lax.stop_gradient(d), negative)
    threshold = d + margin
    num_active = mining.rank_in_rows(negatives.values, lax.stop_gradient(threshold), side="left")
    is_negative = jnp.arange(d.shape[1])[None, :] < negatives.count[:, None]
    sorted_d = jnp.where(is_negative, jnp.take_along_axis(d, negatives.columns, axis=1), 0.0)
    prefix = jnp.concatenate([jnp.zeros_like(sorted_d[:, :1]), jnp.cumsum(sorted_d, axis=1)],
                             axis=1)
    active_d_an = jnp.take_along_axis(prefix, num_active, axis=1)
    pair_loss = num_active * threshold - active_d_an
    negatives_per_pair = jnp.where(positive, negatives.count[:, None], 0).astype(jnp.float32)
    stats = {"count": jnp.sum(jnp.where(positive, num_active, 0), dtype=jnp.float32),
             "num_triplets": jnp.sum(negatives_per_pair),
             "d_ap_sum": jnp.sum(negatives_per_pair * d),
             "d_an_sum": jnp.sum(jnp.sum(positive, axis=1) * prefix[:, -1])}
    stats["num_active"] = stats["count"]
    return {"loss_sum": jnp.sum(jnp.where(positive, pair_loss, 0.0)),
            **jax.tree.map(lax.stop_gradient, stats)}


def _batch_all_soft_sums(d: jax.Array, positive: jax.Array, negative: jax.Array,
                         margin: Any) -> TripletSums:
    """Batch-all softplus: no closed form, so every triplet is evaluated (O(B³) time), one
    chunk of anchors at a time with `lax.map` under `jax.checkpoint`, so forward and backward
    hold O(chunk·B²) memory."""
    num_anchors, num_candidates = d.shape
    chunk = max(1, min(num_anchors, _SOFT_ALL_CHUNK_ELEMENTS // num_candidates**2))

    @jax.checkpoint
    def anchor_sums(row: tuple[jax.Array, jax.Array, jax.Array]) -> TripletSums:
        d_row, positive_row, negative_row = row
        d_ap, d_an = d_row[:, None], d_row[None, :]
        valid = positive_row[:, None] & negative_row[None, :]
        return _term_sums(d_ap, d_an, valid, margin, soft=True)

    per_anchor = lax.map(anchor_sums, (d, positive, negative), batch_size=chunk)
    return jax.tree.map(jnp.sum, per_anchor)


def _check_anchor_rows(anchor_start: jax.Array | int, num_anchors: int,
                       num_candidates: int) -> None:
    """The anchor rows must lie inside the batch: lax.dynamic_slice would silently shift an
    overhanging slice back inside, mining other anchors than asked. A traced anchor_start
    (inside shard_map) cannot be checked here; equal slices of the batch always fit."""
    if not 1 <= num_anchors <= num_candidates:
        raise ValueError(f"num_anchors={num_anchors} must lie in [1, {num_candidates}] (the "
                         "batch size)")
    if isinstance(anchor_start, int) and not 0 <= anchor_start <= num_candidates - num_anchors:
        raise ValueError(f"anchors [{anchor_start}, {anchor_start + num_anchors}) overhang the "
                         f"batch of {num_candidates}; use 0 <= anchor_start <= "
                         f"{num_candidates - num_anchors}")


def _check_anchor_chunk(anchor_chunk: Any) -> None:
    if anchor_chunk is not None and (isinstance(anchor_chunk, bool) or not isinstance(
            anchor_chunk, numbers.Integral) or anchor_chunk < 1):
        raise ValueError(f"anchor_chunk must be None (automatic) or an int >= 1, got "
                         f"{anchor_chunk!r}")


def triplet_loss_sums(embeddings: jax.Array, labels: jax.Array, *, anchor_start: jax.Array | int,
                      num_anchors: int, margin: Any, strategy: str, distance: str = "squared",
                      soft: bool = False, key: jax.Array | None = None,
                      anchor_chunk: int | None = None, candidate_mask: jax.Array | None = None,
                      **strategy_options: Any) -> TripletSums:
    """Additive loss sums for anchors [anchor_start, anchor_start + num_anchors) of the batch.

    embeddings: [B,D] (unit vectors for distance_weighted); labels: [B] int. The anchors are
    mined against all B candidates; anchor_start may be traced (e.g. axis_index * b),
    num_anchors is static. Returns float32 scalars keyed by SUM_KEYS; adding the dicts of a
    partition of the anchors (e.g. `lax.psum`) and applying `reduce_triplet_sums` gives
    `triplet_loss` on the whole batch. Only "loss_sum" carries a gradient. `key` is required by
    the strategies that draw (`Strategy.needs_key`) and ignored by the others. See the module docstring for the rules.

    anchor_chunk (static int): mine the anchors in blocks of this many rows, one after the
    other; differentiated, each block's gradient is taken as soon as its forward pass is done
    and only the [B,D] gradient is kept (`_sums_by_blocks`), so memory is O(chunk·B) forward
    and backward and nothing is recomputed: for B far above num_anchors (a memory bank,
    global mining over many devices) and, by default, for large batches. The same triplets,
    counts and stats; values and gradients equal up to float summation order. More than one
    block supports reverse-mode differentiation only (no jvp).
    None (default): `auto_anchor_chunk`, blocks of at most AUTO_CHUNK_ELEMENTS entries on the
    CPU (one block for every batch up to 724), ACCELERATOR_CHUNK_ELEMENTS on GPUs and TPUs
    (up to 4,096); pass num_anchors for one block always.
    candidate_mask: optional bool [B]; columns where it is False are neither positives nor
    negatives of any anchor (nor in the spread), e.g. the empty slots of a memory bank.
    """
    settings = validate_loss_args(margin=margin, strategy=strategy, distance=distance,
                                  soft=soft, strategy_options=strategy_options)
    spec = MINING_STRATEGIES.get(strategy)
    if spec.needs_key and key is None:
        raise ValueError(f"strategy {strategy!r} samples negatives: pass key=jax.random.key(...)")
    num_candidates = embeddings.shape[0]
    _check_anchor_rows(anchor_start, num_anchors, num_candidates)
    _check_anchor_chunk(anchor_chunk)
    if candidate_mask is not None and candidate_mask.shape != (num_candidates,):
        raise ValueError(f"candidate_mask has shape {candidate_mask.shape}; it must be "
                         f"({num_candidates},), one flag per candidate row")

    def block_sums(embeddings: jax.Array, margin: Any, start: jax.Array | int,
                   rows: int) -> TripletSums:
        return _anchor_block_sums(embeddings, labels, start, rows, margin=margin,
                                  spec=spec, distance=distance, soft=soft, key=key,
                                  candidate_mask=candidate_mask, settings=settings)

    if anchor_chunk is None:
        anchor_chunk = auto_anchor_chunk(num_anchors, num_candidates)
    if anchor_chunk >= num_anchors:
        return block_sums(embeddings, margin, anchor_start, num_anchors)
    return _sums_by_blocks(block_sums, embeddings, jnp.asarray(margin, jnp.float32),
                           anchor_start, num_anchors, anchor_chunk)


def auto_anchor_chunk(num_anchors: int, num_candidates: int,
                      backend: str | None = None) -> int:
    """anchor_chunk=None's block size: the fewest blocks of at most AUTO_CHUNK_ELEMENTS
    [anchor, candidate] entries on the CPU (ACCELERATOR_CHUNK_ELEMENTS on other backends;
    None: JAX's default backend), evened out to a divisor of num_anchors when one lies within
    twice that many blocks (a shorter last block is one more program to compile)."""
    backend = jax.default_backend() if backend is None else backend
    limit = AUTO_CHUNK_ELEMENTS if backend == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    fewest = max(1, -(-num_anchors * num_candidates // limit))
    for blocks in range(fewest, min(2 * fewest, num_anchors) + 1):
        if num_anchors % blocks == 0:
            return num_anchors // blocks
    return -(-num_anchors // fewest)


BlockSums = Callable[[jax.Array, Any, Any, int], TripletSums]


def _sums_by_blocks(block_sums: BlockSums, embeddings: jax.Array, margin: jax.Array,
                    anchor_start: jax.Array | int, num_anchors: int,
                    chunk: int) -> TripletSums:
    """The sums of anchors [anchor_start, +num_anchors) in blocks of `chunk` rows, one after
    the other; block_sums(embeddings, margin, start, rows) -> one block's sums.

    Under reverse-mode differentiation each block's gradient is taken right after its forward
    pass (`jax.vjp`) and accumulated into the [B,D] gradient, so neither pass holds more than
    one block's [chunk, B] arrays and nothing is recomputed. Only loss_sum carries a gradient,
    to the embeddings and the margin (as without blocks); forward-mode (jvp) is not defined.
    """
    num_blocks, tail = divmod(num_anchors, chunk)
    offsets = chunk * jnp.arange(num_blocks)
    tail_start = anchor_start + num_blocks * chunk
    Gradient = tuple[jax.Array, jax.Array]  # with respect to (embeddings, margin)

    def add(total: Any, more: Any) -> Any:
        return jax.tree.map(jnp.add, total, more)

    def over_blocks(per_block: TripletSums) -> TripletSums:
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_block)

    def forward(embeddings: jax.Array, margin: jax.Array) -> TripletSums:
        sums = over_blocks(lax.map(lambda offset: block_sums(
            embeddings, margin, anchor_start + offset, chunk), offsets))
        return add(sums, block_sums(embeddings, margin, tail_start, tail)) if tail else sums

    def with_gradient(embeddings: jax.Array, margin: jax.Array, start: Any, rows: int
                      ) -> tuple[TripletSums, Gradient]:
        sums, pullback = jax.vjp(lambda e, m: block_sums(e, m, start, rows), embeddings, margin)
        seed = {name: jnp.ones_like(value) if name == "loss_sum" else jnp.zeros_like(value)
                for name, value in sums.items()}
        return sums, pullback(seed)

    def forward_and_gradient(embeddings: jax.Array, margin: jax.Array
                             ) -> tuple[TripletSums, Gradient]:
        def step(gradient: Gradient, offset: jax.Array) -> tuple[Gradient, TripletSums]:
            sums, block_gradient = with_gradient(embeddings, margin, anchor_start + offset,
                                                 chunk)
            return add(gradient, block_gradient), sums

        zero = (jnp.zeros_like(embeddings), jnp.zeros_like(margin))
        gradient, per_block = lax.scan(step, zero, offsets)
        sums = over_blocks(per_block)
        if tail:
            tail_sums, tail_gradient = with_gradient(embeddings, margin, tail_start, tail)
            sums, gradient = add(sums, tail_sums), add(gradient, tail_gradient)
        return sums, gradient

    def backward(gradient: Gradient, cotangent: TripletSums) -> Gradient:
        return tuple(cotangent["loss_sum"] * g for g in gradient)

    blocked = jax.custom_vjp(forward)
    blocked.defvjp(forward_and_gradient, backward)
    # Under shard_map with check_vma (the train step's per-device sums), the margin is the
    # same on every device but the gradient `backward` returns for it is each device's: typed
    # as varying over the manual axes, as the embeddings are (the cast's transpose then sums
    # those gradients over the devices).
    manual_axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if manual_axes:
        margin = lax.pcast(margin, manual_axes, to="varying")
    return blocked(embeddings, margin)


def _anchor_block_sums(embeddings: jax.Array, labels: jax.Array, anchor_start: jax.Array | int,
                       num_anchors: int, *, margin: Any, spec: Strategy, distance: str,
                       soft: bool, key: jax.Array | None, candidate_mask: jax.Array | None,
                       settings: dict[str, Any]) -> TripletSums:
    """`triplet_loss_sums` of one block of anchor rows, arguments already checked."""
    num_candidates = embeddings.shape[0]
    d = anchor_distance_rows(embeddings, anchor_start, num_anchors, distance)
    d_fixed = lax.stop_gradient(d)
    positive, negative = mining.label_masks(labels, anchor_start, num_anchors)
    not_self = (anchor_start + jnp.arange(num_anchors))[:, None] != jnp.arange(num_candidates)
    num_spread = num_anchors * (num_candidates - 1)
    if candidate_mask is not None:
        positive, negative = positive & candidate_mask, negative & candidate_mask
        not_self = not_self & candidate_mask
        num_spread = jnp.sum(not_self, dtype=jnp.float32)

    if spec.block_sums is not None:
        sums = spec.block_sums(d, positive, negative, margin, soft, **settings)
    else:
        uniform = (mining.row_uniforms(key, anchor_start, num_anchors, num_candidates)
                   if spec.needs_key else None)
        chosen = spec.pairs(MiningInputs(d_fixed, positive, negative, margin, uniform,
                                         distance, embeddings.shape[1]), **settings)
        sums = _pair_sums(d, chosen, margin, soft)

    zero = jnp.zeros((), jnp.float32)
    return {"semihard_found": zero, "semihard_pairs": zero, **sums,
            "spread_sum": jnp.sum(jnp.where(not_self, d_fixed, 0.0)),
            "spread_count": jnp.asarray(num_spread, jnp.float32)}


def _batch_all_sums(d: jax.Array, positive: jax.Array, negative: jax.Array, margin: Any,
                    soft: bool) -> TripletSums:
    all_sums = _batch_all_soft_sums if soft else _batch_all_hinge_sums
    return all_sums(d, positive, negative, margin)


# The strategies, in the order they are listed (module docstring).
MINING_STRATEGIES.add("semihard", Strategy(
    pairs=lambda i, max_positives: mining.mine_semihard(i.d, i.positive, i.negative,
                                                        max_positives=max_positives),
    block_sums=_semihard_sums, options={"max_positives": None}, check=_semihard_settings))
MINING_STRATEGIES.add("semihard_facenet", Strategy(
    pairs=lambda i: mining.mine_semihard_facenet(i.d, i.positive, i.negative, i.margin,
                                                 i.uniform),
    needs_key=True))
MINING_STRATEGIES.add("hardest", Strategy(pairs=_hardest_pairs, block_sums=_hardest_sums))
MINING_STRATEGIES.add("all", Strategy(pairs=None, block_sums=_batch_all_sums))
MINING_STRATEGIES.add("random", Strategy(
    pairs=lambda i: mining.mine_random(i.positive, i.negative, i.uniform), needs_key=True))
MINING_STRATEGIES.add("distance_weighted", Strategy(
    pairs=lambda i, **settings: mining.mine_distance_weighted(
        i.d, i.positive, i.negative, i.uniform, distance=i.distance,
        embedding_dim=i.embedding_dim, **settings),
    options={"cutoff": 0.5, "nonzero_loss_cutoff": 1.4}, check=_distance_weighted_settings,
    needs_key=True))

# The registered names and their properties, as constants (the registry is the source of truth).
STRATEGIES = MINING_STRATEGIES.names()
RANDOM_STRATEGIES = tuple(n for n in STRATEGIES if MINING_STRATEGIES.get(n).needs_key)
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    n: dict(MINING_STRATEGIES.get(n).options) for n in STRATEGIES
    if MINING_STRATEGIES.get(n).options}


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (counts are ≥ 0)."""
    return numerator / jnp.maximum(denominator, 1.0)


def reduce_triplet_sums(sums: TripletSums) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sums (added over any partition of the anchors) -> (loss, stats), all NaN-free."""
    stats = {"num_triplets": sums["num_triplets"], "num_active": sums["num_active"],
             "active_fraction": _ratio(sums["num_active"], sums["num_triplets"]),
             "mean_d_ap": _ratio(sums["d_ap_sum"], sums["num_triplets"]),
             "mean_d_an": _ratio(sums["d_an_sum"], sums["num_triplets"]),
             "semihard_found_fraction": _ratio(sums["semihard_found"], sums["semihard_pairs"]),
             "embedding_spread": _ratio(sums["spread_sum"], sums["spread_count"])}
    return _ratio(sums["loss_sum"], sums["count"]), stats


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: Any, strategy: str,
                 distance: str = "squared", soft: bool = False, key: jax.Array | None = None,
                 anchor_chunk: int | None = None,
                 **strategy_options: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean triplet loss of the batch and its mining stats (STATS_KEYS).

    embeddings: [B,D]; labels: [B] int -> (loss scalar, dict of scalars). The rules are in the
    module docstring; this is `triplet_loss_sums` over all B anchors (in blocks of
    `anchor_chunk` rows if given), reduced.
    """
    return reduce_triplet_sums(triplet_loss_sums(
        embeddings, labels, anchor_start=0, num_anchors=embeddings.shape[0], margin=margin,
        strategy=strategy, distance=distance, soft=soft, key=key, anchor_chunk=anchor_chunk,
        **strategy_options))
