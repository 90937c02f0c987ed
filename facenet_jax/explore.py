"""Looking inside mining and evaluation: what the notebooks in `notebooks/` call.

Host-side helpers (numpy in, numpy and matplotlib figures out) built on the package's pure
functions:

- `mined_triplets`: the (anchor, positive, negative) indices each strategy of
  `facenet_jax.losses` picks in a batch, exactly the terms its loss averages;
- `triplet_gaps`, `pair_distance_sets`: d(a,n) − d(a,p) over every valid triplet, and the
  positive / negative pair distances, for the margin-band picture;
- `margin_response`: loss, mining stats and the gradient norm w.r.t. the embeddings as α varies;
- `degenerate_batches`: a batch made degenerate in each way a sampled batch can be (no positive
  pair, one identity, duplicates, collapsed), all of which training must survive;
- `oneshot_predictions`: per-probe results of one-shot identification (enrol one image per
  identity), the per-image view of `metrics.oneshot_identification`;
- `nearest_neighbours`: each query image's nearest other images, for looking at a model's
  errors on real faces (`notebooks/reproduce_facenet.ipynb`);
- figure builders for all of these (matplotlib `Figure`, no pyplot state, as in `plots`).

Small batches only: `mined_triplets("all")` and `triplet_gaps` list every valid triplet
(O(B³) host memory), which is the point of looking at them and why training never does.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from facenet_jax import losses
from facenet_jax.config import load_config
from facenet_jax.eval import metrics
from facenet_jax.losses import mining
from facenet_jax.losses.distances import anchor_distance_rows

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
# The shared real-face data beside a checkout (`../shared/data` from the repository root, as
# the tests look for it); the notebooks use it when present.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
DEGENERATE_CASES = ("as sampled", "no positive pair", "one identity (no negative)",
                    "duplicates (K copies of one image)", "collapsed (all equal)")
# Listing every triplet is O(B³): refuse batches where that stops being a quick look.
MAX_LISTED_BATCH = 512


# ----------------------------------------------------------------------------------------------
# Set-up for the notebooks.


def default_config(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """experiments/default.py with dotted overrides ({"num_steps": 60}); the checkout's copy."""
    if not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f"{DEFAULT_CONFIG} not found: the notebooks need the repository "
                                "checkout (pip install -e .), not an installed wheel")
    return load_config(DEFAULT_CONFIG, overrides)


def random_unit_batch(identities: int, images_per_identity: int, dim: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Untrained-encoder stand-in: P×K Gaussian directions on the unit sphere, labelled in
    contiguous blocks like a PKSampler batch -> (embeddings float32 [P*K, dim], labels [P*K])."""
    if identities < 1 or images_per_identity < 1 or dim < 1:
        raise ValueError(f"need identities, images_per_identity, dim ≥ 1; got {identities}, "
                         f"{images_per_identity}, {dim}")
    x = np.random.default_rng(seed).standard_normal((identities * images_per_identity, dim))
    labels = np.repeat(np.arange(identities, dtype=np.int32), images_per_identity)
    return metrics.l2_normalize_rows(x).astype(np.float32), labels


def _check_batch(embeddings: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"expected embeddings [B,D] and labels [B]; got {emb.shape} and "
                         f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN/inf; the encoder diverged")
    return emb, labels.astype(np.int32)


def _check_listable(batch_size: int) -> None:
    if batch_size > MAX_LISTED_BATCH:
        raise ValueError(f"listing every triplet of a batch of {batch_size} is O(B³); look at "
                         f"a batch of at most {MAX_LISTED_BATCH} (fewer identities or images)")


# ----------------------------------------------------------------------------------------------
# Which triplets each strategy picks.


class MinedTriplets(NamedTuple):
    """The terms one strategy's loss averages: triplet t is (anchor[t], positive[t],
    negative[t]), rows of the batch; active[t]: d(a,n) < d(a,p) + margin. Each [T]."""
    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    active: np.ndarray


def mined_triplets(embeddings: Any, labels: Any, *, margin: float, strategy: str,
                   distance: str = "squared", seed: int = 0,
                   **strategy_options: Any) -> MinedTriplets:
    """The triplets `losses.triplet_loss(..., key=jax.random.key(seed))` uses on this batch.

    embeddings [B,D], labels [B] int. Per strategy (rules in `facenet_jax.losses.triplet`):
    "hardest": one triplet per anchor with both a positive and a negative; "all": every valid
    triplet (the loss averages the active ones); the others: one triplet per ordered
    anchor–positive pair that got a negative. Built from the same mining functions and random
    draws as the loss, so its hinge mean over the right terms is the loss (tested).
    """
    settings = losses.validate_loss_args(margin=margin, strategy=strategy, distance=distance,
                                         soft=False, strategy_options=strategy_options)
    emb, labels = _check_batch(embeddings, labels)
    every_triplet = losses.MINING_STRATEGIES.get(strategy).pairs is None
    if every_triplet:
        _check_listable(len(emb))
    d, positive, negative, column, has_term = map(np.asarray, _mine_pairs(
        jnp.asarray(emb), jnp.asarray(labels), jnp.float32(margin), jax.random.key(seed),
        strategy, distance, tuple(sorted(settings.items()))))
    if every_triplet:
        anchor, pos, neg = np.nonzero(positive[:, :, None] & negative[:, None, :])
        return _with_activity(d, margin, anchor, pos, neg)
    anchor, pos = np.nonzero(has_term)
    return _with_activity(d, margin, anchor, pos, column[anchor, pos])


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _mine_pairs(embeddings: jax.Array, labels: jax.Array, margin: jax.Array, key: jax.Array,
                strategy: str, distance: str, settings: tuple[tuple[str, Any], ...]
                ) -> tuple[jax.Array, ...]:
    """The strategy's miner (losses.MINING_STRATEGIES) called as `losses.triplet_loss_sums`
    calls it (same rows, same draws; `settings` resolved by validate_loss_args) ->
    (d, positive, negative, column, has_term), each [B,B]: the pair (a, p) is a term when
    has_term[a, p], with negative column[a, p]. "hardest" is one pair per anchor; a strategy
    without pair terms ("all") is left to the caller (every valid triplet), with
    has_term = positive."""
    batch = embeddings.shape[0]
    d = anchor_distance_rows(embeddings, 0, batch, distance)
    positive, negative = mining.label_masks(labels, 0, batch)
    spec = losses.MINING_STRATEGIES.get(strategy)
    if spec.pairs is None:
        return d, positive, negative, jnp.zeros(d.shape, jnp.int32), positive
    uniform = mining.row_uniforms(key, 0, batch, batch) if spec.needs_key else None
    chosen = spec.pairs(losses.MiningInputs(d, positive, negative, margin, uniform, distance,
                                            embeddings.shape[1]), **dict(settings))
    return d, positive, negative, chosen.column, chosen.has_term


def _with_activity(d: np.ndarray, margin: float, anchor: np.ndarray, positive: np.ndarray,
                   negative: np.ndarray) -> MinedTriplets:
    active = d[anchor, negative] < d[anchor, positive] + margin
    return MinedTriplets(*(np.asarray(a, dtype=np.int64) for a in (anchor, positive, negative)),
                         active)


# ----------------------------------------------------------------------------------------------
# Distance distributions.


def pair_distance_sets(embeddings: Any, labels: Any, *, distance: str = "squared"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(d(a,p) over ordered positive pairs, d(a,n) over ordered negative pairs) of the batch,
    each a flat float array (an image is not its own positive)."""
    emb, labels = _check_batch(embeddings, labels)
    d = np.asarray(losses.pairwise_distances(jnp.asarray(emb), distance))
    positive, negative = map(np.asarray, mining.label_masks(jnp.asarray(labels), 0, len(emb)))
    return d[positive], d[negative]


def triplet_gaps(embeddings: Any, labels: Any, *, distance: str = "squared") -> np.ndarray:
    """d(a,n) − d(a,p) over every valid triplet of the batch, [T] (O(B³): small batches).

    With margin α a triplet is hard when the gap is < 0, semi-hard in [0, α), easy at ≥ α
    (zero hinge loss)."""
    emb, labels = _check_batch(embeddings, labels)
    _check_listable(len(emb))
    d = np.asarray(losses.pairwise_distances(jnp.asarray(emb), distance))
    positive, negative = map(np.asarray, mining.label_masks(jnp.asarray(labels), 0, len(emb)))
    gaps = d[:, None, :] - d[:, :, None]  # [a, p, n]
    return gaps[positive[:, :, None] & negative[:, None, :]]


def gap_fractions(gaps: np.ndarray, margin: float) -> dict[str, float]:
    """Fractions of triplets that are hard (gap < 0), semi-hard (0 ≤ gap < α), easy (≥ α)."""
    gaps = np.asarray(gaps)
    if gaps.size == 0:
        return {"hard": 0.0, "semihard": 0.0, "easy": 0.0}
    return {"hard": float(np.mean(gaps < 0)),
            "semihard": float(np.mean((gaps >= 0) & (gaps < margin))),
            "easy": float(np.mean(gaps >= margin))}


# ----------------------------------------------------------------------------------------------
# Loss, stats and gradient against the margin.


def _loss_stats_gradient(embeddings: jax.Array, labels: jax.Array, margin: jax.Array,
                         key: jax.Array, strategy: str, distance: str, soft: bool
                         ) -> dict[str, jax.Array]:
    def loss_fn(e: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return losses.triplet_loss(e, labels, margin=margin, strategy=strategy,
                                   distance=distance, soft=soft, key=key)

    (loss, stats), gradient = jax.value_and_grad(loss_fn, has_aux=True)(embeddings)
    return {"loss": loss, **stats, "grad_norm": jnp.linalg.norm(gradient),
            "grad_finite": jnp.all(jnp.isfinite(gradient))}


# One compile per (strategy, distance, soft, batch shape); the margin is traced, so a sweep over
# α and every degenerate batch reuse it.
_loss_stats_gradient_jit = jax.jit(_loss_stats_gradient, static_argnums=(4, 5, 6))


def margin_response(embeddings: Any, labels: Any, margins: Sequence[float], *, strategy: str,
                    distance: str = "squared", soft: bool = False, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """For each margin α in `margins` [M]: the loss, every stat of `losses.STATS_KEYS`, the
    norm of the gradient of the loss w.r.t. the embeddings [B,D] and whether that gradient is
    finite -> dict of [M] arrays (one batch, one random key for every α)."""
    if not len(margins):
        raise ValueError("margins is empty: pass at least one α")
    for margin in margins:
        losses.validate_loss_args(margin=float(margin), strategy=strategy, distance=distance,
                                  soft=soft)
    emb, labels = _check_batch(embeddings, labels)
    emb, labels, key = jnp.asarray(emb), jnp.asarray(labels), jax.random.key(seed)
    per_margin = [_loss_stats_gradient_jit(emb, labels, jnp.float32(margin), key, strategy,
                                           distance, soft) for margin in margins]
    return {name: np.stack([np.asarray(r[name]) for r in per_margin])
            for name in per_margin[0]}


def degenerate_batches(embeddings: Any, labels: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The batch (embeddings [B,D], labels [B]) and versions of it made degenerate, keyed by
    DEGENERATE_CASES; all keep the shape [B,D], so one compile serves them all."""
    emb, labels = _check_batch(embeddings, labels)
    _, first_of_label = np.unique(labels, return_index=True)
    first_row = first_of_label[np.searchsorted(np.unique(labels), labels)]
    return {
        "as sampled": (emb, labels),
        "no positive pair": (emb, np.arange(len(labels), dtype=np.int32)),
        "one identity (no negative)": (emb, np.zeros_like(labels)),
        "duplicates (K copies of one image)": (emb[first_row], labels),
        "collapsed (all equal)": (np.broadcast_to(emb[:1], emb.shape).copy(), labels),
    }


DEGENERATE_COLUMNS = ("batch", "strategy", "loss", "num_triplets", "active_fraction",
                      "semihard_found_fraction", "embedding_spread", "grad_norm", "grad_finite")


def degenerate_report(embeddings: Any, labels: Any, *, margin: float,
                      distance: str = "squared", strategies: Sequence[str] = losses.STRATEGIES,
                      seed: int = 0) -> list[dict[str, Any]]:
    """One row per (degenerate case, strategy): `margin_response` at this margin, as scalars,
    with "batch" and "strategy" names (columns as DEGENERATE_COLUMNS, and every stat)."""
    rows = []
    for case, (emb, case_labels) in degenerate_batches(embeddings, labels).items():
        for strategy in strategies:
            response = margin_response(emb, case_labels, [margin], strategy=strategy,
                                       distance=distance, seed=seed)
            rows.append({"batch": case, "strategy": strategy,
                         **{name: value[0].item() for name, value in response.items()}})
    return rows


def stats_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows of dicts -> a fixed-width text table of the given columns (floats to 4 places)."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One-shot identification, image by image.


class OneShot(NamedTuple):
    """gallery: [G] enrolled rows (one per identity, ascending label); probes: [Q] the other
    rows; predicted: [Q] label of each probe's nearest enrolled image; hit: [Q] bool."""
    gallery: np.ndarray
    probes: np.ndarray
    predicted: np.ndarray
    hit: np.ndarray


def oneshot_predictions(embeddings: Any, labels: Any, *, distance: str = "squared",
                        seed: int = 0) -> OneShot:
    """Enrol one image per identity (`metrics.enrolment_indices(labels, seed)`), identify every
    other image by its nearest enrolled image (distance ties go to the lower label, as in
    `metrics.oneshot_identification`, whose top-1 accuracy is the mean of `hit`)."""
    emb, labels = _check_batch(embeddings, labels)
    gallery = metrics.enrolment_indices(labels, seed)
    probes = np.setdiff1d(np.arange(len(labels)), gallery)
    d = np.asarray(losses.pairwise_distances_between(jnp.asarray(emb[probes]),
                                                     jnp.asarray(emb[gallery]), distance))
    predicted = labels[gallery][np.argmin(d, axis=1)]  # argmin keeps the first (lowest label)
    return OneShot(gallery, probes, predicted, predicted == labels[probes])


def nearest_neighbours(embeddings: Any, queries: Sequence[int], *, k: int = 3,
                       distance: str = "squared") -> tuple[np.ndarray, np.ndarray]:
    """The k rows nearest each query row, the query itself left out: (indices int [Q, k],
    distances float [Q, k]), nearest first (ties: the lower index first)."""
    emb = np.asarray(embeddings, np.float32)
    queries = np.asarray(queries, np.int64)
    if emb.ndim != 2 or not np.all(np.isfinite(emb)):
        raise ValueError(f"embeddings must be a finite [N, D] array, got shape {emb.shape}")
    if queries.ndim != 1 or np.any((queries < 0) | (queries >= len(emb))):
        raise ValueError(f"queries must be row indices in [0, {len(emb)}), got {queries}")
    if not 1 <= k < len(emb):
        raise ValueError(f"k must be in [1, {len(emb) - 1}] (N - 1 other rows), got {k}")
    d = np.array(losses.pairwise_distances_between(jnp.asarray(emb[queries]), jnp.asarray(emb),
                                                   distance))
    d[np.arange(len(queries)), queries] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Figures.


def _identity_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order [B] sorting rows by label, stably; position [B] of each row in that order)."""
    order = np.argsort(labels, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return order, position


def _draw_distance_matrix(ax: Any, d: np.ndarray, labels: np.ndarray, title: str
                          ) -> tuple[Any, np.ndarray]:
    """Heatmap of d ordered by identity with block boundaries -> (the image, each batch row's
    position on the axes)."""
    order, position = _identity_order(labels)
    image = ax.imshow(d[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 0.5
    for b in boundaries:
        ax.axhline(b, color="w", lw=0.4)
        ax.axvline(b, color="w", lw=0.4)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return image, position


def distance_matrix_figure(embeddings: Any, labels: Any, *, distance: str = "squared",
                           title: str = "Pairwise distances") -> Figure:
    """The B×B distance matrix as a heatmap, rows and columns ordered by identity (white lines
    between identities: the diagonal blocks are the positive pairs)."""
    emb, labels = _check_batch(embeddings, labels)
    d = np.asarray(losses.pairwise_distances(jnp.asarray(emb), distance))
    fig = Figure(figsize=(5.2, 4.5))
    ax = fig.add_subplot()
    image, _ = _draw_distance_matrix(ax, d, labels, f"{title} ({distance})")
    fig.colorbar(image, ax=ax, label=f"{distance} distance")
    ax.set_xlabel("candidate (ordered by identity)")
    ax.set_ylabel("anchor (ordered by identity)")
    fig.tight_layout()
    return fig


def mined_triplets_figure(embeddings: Any, labels: Any, anchors: Sequence[int], *,
                          margin: float, distance: str = "squared",
                          strategies: Sequence[str] = losses.STRATEGIES, seed: int = 0
                          ) -> Figure:
    """One panel per strategy: the distance matrix with, on the rows of `anchors` (batch rows),
    the positives each chosen triplet uses (white circles) and its negatives (red crosses:
    active, i.e. d(a,n) < d(a,p) + α; orange: inactive)."""
    emb, labels = _check_batch(embeddings, labels)
    anchors = np.asarray(anchors, dtype=np.int64)
    if anchors.size == 0 or anchors.min() < 0 or anchors.max() >= len(labels):
        raise ValueError(f"anchors must be rows in [0, {len(labels)}), got {anchors.tolist()}")
    d = np.asarray(losses.pairwise_distances(jnp.asarray(emb), distance))
    columns = min(3, len(strategies))
    rows = -(-len(strategies) // columns)
    fig = Figure(figsize=(4.2 * columns, 4.3 * rows))
    for i, strategy in enumerate(strategies):
        triplets = mined_triplets(emb, labels, margin=margin, strategy=strategy,
                                  distance=distance, seed=seed)
        shown = np.isin(triplets.anchor, anchors)
        ax = fig.add_subplot(rows, columns, i + 1)
        _, position = _draw_distance_matrix(ax, d, labels, "")
        a = position[triplets.anchor[shown]]
        active = triplets.active[shown]
        ax.scatter(position[triplets.positive[shown]], a, s=30, facecolors="none",
                   edgecolors="w", lw=1.0)
        for mask, color in ((~active, "orange"), (active, "red")):
            ax.scatter(position[triplets.negative[shown]][mask], a[mask], s=26, marker="x",
                       color=color, lw=1.2)
        ax.set_title(f"{strategy}: {int(shown.sum())} triplets for {len(anchors)} anchors, "
                     f"{int(active.sum())} active", fontsize=8.5)
    fig.suptitle(f"What each strategy picks (α = {margin} on {distance} distance; circles: "
                 "positives, red x: active negatives, orange x: inactive)", fontsize=10)
    fig.tight_layout()
    return fig


def distance_distribution_figure(embeddings: Any, labels: Any, *, margin: float,
                                 distance: str = "squared") -> Figure:
    """Left: d(a,p) and d(a,n) over the batch's pairs, with the semi-hard band
    [median d(a,p), median d(a,p) + α] shaded. Right: d(a,n) − d(a,p) over every valid triplet,
    hard (< 0), semi-hard ([0, α)) and easy (≥ α) regions shaded with their fractions."""
    d_ap, d_an = pair_distance_sets(embeddings, labels, distance=distance)
    gaps = triplet_gaps(embeddings, labels, distance=distance)
    fig = Figure(figsize=(11, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    edges = np.histogram_bin_edges(np.concatenate([d_ap, d_an, [0.0]]), bins=50)
    for values, name, color in ((d_ap, "d(a,p), same identity", "C2"),
                                (d_an, "d(a,n), different identity", "C3")):
        if values.size:
            left.hist(values, bins=edges, density=True, alpha=0.55, color=color,
                      label=f"{name} ({values.size})")
    if d_ap.size:
        typical = float(np.median(d_ap))
        left.axvspan(typical, typical + margin, color="gold", alpha=0.3,
                     label=f"semi-hard band: median d(a,p) + [0, α={margin}]")
    left.set_xlabel(f"{distance} distance")
    left.set_ylabel("density")
    left.set_title("Pair distances in the batch", fontsize=10)
    left.legend(fontsize=7)
    if gaps.size:
        fractions = gap_fractions(gaps, margin)
        right.hist(gaps, bins=60, color="C0", alpha=0.8)
        lo, hi = min(gaps.min(), 0.0), max(gaps.max(), margin)
        for (start, stop), name, color in (((lo, 0.0), "hard", "C3"),
                                           ((0.0, margin), "semihard", "gold"),
                                           ((margin, hi), "easy", "C2")):
            right.axvspan(start, stop, color=color, alpha=0.2,
                          label=f"{name}: {100 * fractions[name]:.1f}%")
        right.legend(fontsize=8)
    right.set_xlabel("d(a,n) − d(a,p)")
    right.set_ylabel("triplets")
    right.set_title(f"All {gaps.size} valid triplets (easy ones have zero loss)", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def margin_response_figure(margins: Sequence[float],
                           responses: Mapping[str, Mapping[str, np.ndarray]], *,
                           distance: str = "squared",
                           keys: Sequence[str] = ("loss", "active_fraction", "grad_norm")
                           ) -> Figure:
    """One panel per key of `margin_response` results, value against α, one line per
    strategy (responses: strategy -> margin_response(...))."""
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for strategy, response in responses.items():
            ax.plot(margins, response[key], "o-", ms=3, lw=1.3, label=strategy)
        ax.set_xlabel(f"margin α ({distance} distance)")
        ax.set_title(key if key != "grad_norm" else "‖∂loss/∂embeddings‖", fontsize=10)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def oneshot_figure(images: np.ndarray, labels: np.ndarray, result: OneShot, *,
                   examples: int = 4) -> Figure:
    """Up to `examples` hits and `examples` misses: per row the probe image, the enrolled image
    it was matched to, and (misses) its own identity's enrolled image."""
    labels = np.asarray(labels)
    enrolled = dict(zip(labels[result.gallery].tolist(), result.gallery.tolist()))
    picks = [(i, True) for i in np.flatnonzero(result.hit)[:examples]]
    picks += [(i, False) for i in np.flatnonzero(~result.hit)[:examples]]
    if not picks:
        raise ValueError("no probes to show")
    fig = Figure(figsize=(5.2, 1.75 * len(picks)))
    for row, (i, hit) in enumerate(picks):
        probe = result.probes[i]
        shown = [(probe, f"probe (id {labels[probe]})"),
                 (enrolled[int(result.predicted[i])],
                  f"matched id {result.predicted[i]}: {'HIT' if hit else 'MISS'}")]
        if not hit:
            shown.append((enrolled[int(labels[probe])], "its own enrolment"))
        for column, (image_row, title) in enumerate(shown):
            ax = fig.add_subplot(len(picks), 3, 3 * row + column + 1)
            ax.imshow(images[image_row], interpolation="nearest")
            ax.set_title(title, fontsize=8, color="k" if column != 1 else
                         ("green" if hit else "red"))
            ax.axis("off")
    fig.suptitle(f"One-shot identification: {int(result.hit.sum())}/{len(result.hit)} probes "
                 "matched their identity", fontsize=10)
    fig.tight_layout()
    return fig


def neighbours_figure(images: np.ndarray, names: Sequence[str], queries: Sequence[int],
                      neighbours: np.ndarray, distances: np.ndarray) -> Figure:
    """Per row a query image (`images[q]`, `names[q]`) and its neighbours (from
    `nearest_neighbours`), each titled with its name and distance: green when it is the
    query's person, red otherwise."""
    queries = list(queries)
    if not queries or len(neighbours) != len(queries) or len(distances) != len(queries):
        raise ValueError("queries, neighbours and distances need one row per query (>= 1)")
    columns = 1 + neighbours.shape[1]
    fig = Figure(figsize=(1.7 * columns, 1.9 * len(queries)))
    for row, query in enumerate(queries):
        shown = [(query, f"query\n{names[query]}", "k")]
        shown += [(int(n), f"{names[n]}\nd = {d:.3f}",
                   "green" if names[n] == names[query] else "red")
                  for n, d in zip(neighbours[row], distances[row])]
        for column, (index, title, colour) in enumerate(shown):
            ax = fig.add_subplot(len(queries), columns, row * columns + column + 1)
            ax.imshow(images[index], interpolation="nearest")
            ax.set_title(title, fontsize=7, color=colour)
            ax.axis("off")
    fig.suptitle("Nearest neighbours (green: same person)", fontsize=10)
    fig.tight_layout()
    return fig


def verification_figure(first: np.ndarray, second: np.ndarray, distances: Any, is_same: Any,
                        threshold: float) -> Figure:
    """Per row a pair of images [N, H, W, 3] each: the distance, the verdict (same person
    when distance <= threshold, as `Encoder.verify`) and the truth; green right, red wrong."""
    distances, is_same = np.asarray(distances), np.asarray(is_same, bool)
    if not len(first) or not (len(first) == len(second) == len(distances) == len(is_same)):
        raise ValueError("first, second, distances and is_same need the same length (>= 1)")
    fig = Figure(figsize=(3.6, 1.9 * len(first)))
    for row, (a, b, d, same) in enumerate(zip(first, second, distances, is_same)):
        verdict = bool(d <= threshold)
        title = (f"d = {d:.3f}: {'same' if verdict else 'different'} "
                 f"({'right' if verdict == same else 'wrong'})")
        for column, image in enumerate((a, b)):
            ax = fig.add_subplot(len(first), 2, 2 * row + column + 1)
            ax.imshow(image, interpolation="nearest")
            ax.axis("off")
            if column == 0:
                ax.set_title(title, fontsize=8, loc="left",
                             color="green" if verdict == same else "red")
    fig.suptitle(f"verify at threshold {threshold:.3f}", fontsize=10)
    fig.tight_layout()
    return fig
