"""Evaluation metrics: LFW-protocol verification, ROC, retrieval and one-shot identification.

Pure numpy (float64 inside); inputs are numpy arrays, outputs plain Python numbers.

Verification (pairs with fold ids): a pair is accepted as "same" iff its distance is ≤ the
threshold. The default threshold search is exact: the candidates are one value below every
distance (accepts nothing) and each distinct distance (accepts every pair at or below it), found
with one sort and cumulative counts, O(M log M) per fold. threshold_search="grid" is
davidsandberg/facenet's (src/lfw.py, src/facenet.py `calculate_roc`): the first of
GRID_THRESHOLDS = np.arange(0, 4, 0.01) maximising the training folds' accuracy with pairs
accepted iff d < t, recorded as the largest float below t (so "d ≤ threshold" accepts exactly
the pairs "d < t" does, on every path).

The k-fold protocol may subtract a mean embedding (subtract_mean, davidsandberg's
`calculate_roc`): for each held fold, the mean of the other folds' pair embeddings is
subtracted from every embedding before the distances; `fold_distances` gives one row of pair
distances per fold, `held_out_distances` each pair's distance as its own fold is scored (the
ROC, AUC, EER and histogram use those).

- `verification_kfold`: per held fold, the threshold maximising accuracy on the other folds; among
  equally accurate thresholds the *smallest* (a distance that occurs, so an achievable boundary;
  when accepting nothing is best, -inf, which also rejects every held-out pair);
  accuracy on the held fold. Mean and population std (ddof=0, as np.std in the facenet/insightface
  LFW scripts; not the standard error) over folds, all folds weighted equally. Taking a distance
  that occurs keeps the result identical under any increasing map of the distances (squared vs
  euclidean); the price is that held pairs falling strictly between that distance and the next
  training distance are rejected (a slight conservative bias, negligible at LFW's 5,400
  training pairs per fold).
- `val_at_far`: per held fold, the *largest* threshold whose false-accept rate on the other folds
  is ≤ the target: just below (np.nextafter towards -inf) the smallest training different-pair
  distance at which the FAR would pass the target. It always exists (at worst just below every
  different-pair distance: no different pair accepted) and is never forced to 0.
- `roc_curve`, `roc_auc`, `equal_error_rate` over all pairs.

Retrieval and identification (embeddings with identity labels), chunked over queries so memory
is O(chunk_size × N), never N × N:

- `retrieval_metrics`: Recall@K, R-precision, MAP@R (Musgrave, Belongie, Lim 2020, "A Metric
  Learning Reality Check"); each query against all other items.
- `oneshot_identification`: one enrolment image per identity, every other image a probe.

Neighbours at equal distance are ranked by index (retrieval: the candidate's row; identification:
the gallery identity's label), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from facenet_jax.checks import check_one_of, check_positive_int
from facenet_jax.losses.distances import DISTANCES, TINY_SQUARED_NORM

# The evaluation distances: the training ones (losses.distances.DISTANCES) and "angular",
# arccos(cos)/π in [0, 1] (davidsandberg's --distance_metric 1), which no loss uses.
EVAL_DISTANCES = DISTANCES + ("angular",)
THRESHOLD_SEARCHES = ("exact", "grid")
# How a mirror image's embedding joins the image's (eval.flip_mode; embed.make_embedder).
FLIP_MODES = ("sum", "concat")
# davidsandberg's accuracy-threshold grid (src/lfw.py `evaluate`): a pair is accepted iff d < t.
GRID_THRESHOLDS = np.arange(0, 4, 0.01)
# Norms below this count as zero in l2_normalize_rows: a zero row stays zero.
_TINY_NORM = 1e-12
VAL_FAR_TARGETS = {"1e-3": 1e-3, "1e-2": 1e-2}
RETRIEVAL_KS = (1, 5, 10)
ONESHOT_KS = (1, 5)


# ----------------------------------------------------------------------------------------------
# Input checks (clear errors before any long work).


def _finite_vector(values: Any, name: str, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [M], got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{name} has {len(array)} entries but is_same/labels have {length}")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name} has {len(bad)} non-finite values (first at index {bad[0]}: "
                         f"{array[bad[0]]}); NaN/inf usually means the embeddings diverged: "
                         "check the training loss and the checkpoint")
    return array


def _bool_vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype != bool:
        if array.size and not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values {np.unique(array)}")
        array = array.astype(bool)
    return array


def _int_vector(values: Any, name: str, length: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != length:
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_pairs(distances: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 distances [M] and bool is_same [M]; both kinds of pair must be present."""
    same = _bool_vector(is_same, "is_same")
    d = _finite_vector(distances, "distances", len(same))
    if same.all() or not same.any():
        kind = "same" if len(same) and same.all() else "different"
        raise ValueError(f"all {len(same)} pairs are {kind}-identity pairs; verification needs "
                         "both same and different pairs")
    return d, same


def _check_folds(folds: Any, length: int) -> np.ndarray:
    folds = _int_vector(folds, "folds", length)
    if len(np.unique(folds)) < 2:
        raise ValueError("k-fold verification needs at least 2 distinct fold ids in `folds`, got "
                         f"{np.unique(folds).tolist()}")
    return folds


def _check_embeddings(embeddings: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 embeddings [N,D] (finite) and int64 labels [N]."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N,D], got shape {emb.shape}")
    if not np.isfinite(emb).all():
        rows = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        raise ValueError(f"embeddings rows {rows[:5].tolist()} (of {len(rows)} bad rows) are not "
                         "finite; the model diverged or the checkpoint is broken")
    return emb, _int_vector(labels, "labels", len(emb))


def check_eval_distance(distance: str, name: str = "distance") -> None:
    """ValueError naming `name` (e.g. "eval.distance") when `distance` is not in
    EVAL_DISTANCES."""
    if distance not in EVAL_DISTANCES:
        raise ValueError(f"unknown {name} {distance!r}; valid evaluation distances: "
                         f"{', '.join(EVAL_DISTANCES)}")


def check_threshold_search(search: str, name: str = "threshold_search") -> None:
    """ValueError naming `name` when `search` is not in THRESHOLD_SEARCHES."""
    if search not in THRESHOLD_SEARCHES:
        raise ValueError(f"unknown {name} {search!r}; valid: {', '.join(THRESHOLD_SEARCHES)}")


def validate_eval_config(eval_config: Any) -> None:
    """The evaluation protocol's keys (`config.eval`): eval.batch_size (>= 1; its fit to the
    devices is the trainer's check), eval.distance (EVAL_DISTANCES), eval.flip and
    eval.subtract_mean (booleans), eval.flip_mode (FLIP_MODES), eval.threshold_search
    (THRESHOLD_SEARCHES). ValueError naming the key."""
    check_positive_int(eval_config.batch_size, "eval.batch_size")
    check_eval_distance(eval_config.distance, "eval.distance")
    check_threshold_search(eval_config.threshold_search, "eval.threshold_search")
    check_one_of(eval_config.flip_mode, FLIP_MODES, "eval.flip_mode")
    for key in ("flip", "subtract_mean"):
        if not isinstance(eval_config[key], bool):
            raise ValueError(f"eval.{key} must be True or False, got {eval_config[key]!r}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------
# Distances.


def _distance_from_parts(squared_a: np.ndarray, squared_b: np.ndarray, dots: np.ndarray,
                         distance: str) -> np.ndarray:
    """The distance from ||a||², ||b||² and a·b (broadcastable to dots' shape), computed in place
    in `dots` (a fresh float64 array the caller gives up: no N-sized temporaries) and returned."""
    if distance in ("cosine", "angular"):
        dots /= np.sqrt(np.maximum(squared_a, TINY_SQUARED_NORM))
        dots /= np.sqrt(np.maximum(squared_b, TINY_SQUARED_NORM))
        if distance == "angular":  # rounding can take the cosine just past ±1
            np.clip(dots, -1.0, 1.0, out=dots)
            return np.divide(np.arccos(dots, out=dots), np.pi, out=dots)
        np.subtract(1.0, dots, out=dots)
        return np.clip(dots, 0.0, 2.0, out=dots)
    dots *= -2.0
    dots += squared_a
    dots += squared_b
    np.maximum(dots, 0.0, out=dots)  # rounding can go below 0
    return np.sqrt(dots, out=dots) if distance == "euclidean" else dots


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, D] rows of unit L2 norm, in x's dtype (numpy, on the host); an all-zero row
    stays zero. The JAX one, for training and the encoders, is losses.l2_normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _TINY_NORM)


def _distances_between(queries: np.ndarray, candidates: np.ndarray, distance: str) -> np.ndarray:
    """float64 queries [C,D], candidates [N,D] -> [C,N]."""
    return _distance_from_parts(np.sum(queries**2, axis=1)[:, None],
                                np.sum(candidates**2, axis=1)[None, :],
                                queries @ candidates.T, distance)


def pair_distances(embeddings: Any, first: Any, second: Any, distance: str) -> np.ndarray:
    """Distances of pairs: embeddings [N,D], first [M], second [M] row indices -> float64 [M].

    distance: "squared" (||a − b||²), "euclidean" (||a − b||), "cosine" (1 − cos(a, b)) or
    "angular" (arccos(cos(a, b)) / π).
    """
    check_eval_distance(distance)
    return _row_distances(*_pair_rows(embeddings, first, second), distance)


def _pair_rows(embeddings: Any, first: Any, second: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 rows [M,D] of the pairs' first and second embeddings (indices checked)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N,D], got shape {emb.shape}")
    first = np.asarray(first)
    first = _int_vector(first, "pair_first", len(first))
    second = _int_vector(second, "pair_second", len(first))
    for name, index in (("pair_first", first), ("pair_second", second)):
        if index.size and (index.min() < 0 or index.max() >= len(emb)):
            raise ValueError(f"{name} indexes rows [{index.min()}, {index.max()}] but there are "
                             f"{len(emb)} embeddings; the pairs belong to another dataset")
    return emb[first], emb[second]


def _row_distances(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    """float64 a [M,D], b [M,D] -> the distance of each row pair [M]."""
    return _distance_from_parts(np.sum(a * a, axis=1), np.sum(b * b, axis=1),
                                np.sum(a * b, axis=1), distance)


# ----------------------------------------------------------------------------------------------
# Verification over pairs.


def _threshold_sweep(distances: np.ndarray, is_same: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every achievable decision boundary and the pairs it accepts.

    distances [M] float64, is_same [M] bool -> thresholds [T], accepted_same [T],
    accepted_different [T] (int counts of pairs with distance ≤ threshold), T = distinct + 1:
    first a value just below every distance (accepts nothing), then the distinct distances
    ascending. O(M log M).
    """
    values, inverse = np.unique(distances, return_inverse=True)
    same_counts = np.bincount(inverse[is_same], minlength=len(values))
    different_counts = np.bincount(inverse[~is_same], minlength=len(values))
    thresholds = np.concatenate([[np.nextafter(values[0], -np.inf)], values])
    zero = np.zeros(1, dtype=np.int64)
    return (thresholds, np.concatenate([zero, np.cumsum(same_counts)]),
            np.concatenate([zero, np.cumsum(different_counts)]))


def _best_accuracy_threshold(distances: np.ndarray, is_same: np.ndarray) -> float:
    """The smallest threshold maximising accuracy on these pairs (exact search); -inf when
    accepting nothing is best."""
    thresholds, accepted_same, accepted_different = _threshold_sweep(distances, is_same)
    # "Accept nothing" must reject held-out pairs too, even one closer than every training pair
    # (just below the smallest training distance would still accept it).
    thresholds[0] = -np.inf
    correct = accepted_same + (accepted_different[-1] - accepted_different)
    return float(thresholds[np.argmax(correct)])  # argmax: the first (smallest) maximiser


def _grid_accuracy_threshold(distances: np.ndarray, is_same: np.ndarray) -> float:
    """davidsandberg's search: the first t of GRID_THRESHOLDS maximising accuracy on these pairs
    with a pair accepted iff d < t, returned as the largest float below t (the same pairs
    accepted by d ≤ it)."""
    below = {kind: np.searchsorted(np.sort(distances[mask]), GRID_THRESHOLDS, side="left")
             for kind, mask in (("same", is_same), ("different", ~is_same))}
    correct = below["same"] + (int(np.sum(~is_same)) - below["different"])
    return float(np.nextafter(GRID_THRESHOLDS[np.argmax(correct)], -np.inf))


_ACCURACY_THRESHOLD_SEARCH = {"exact": _best_accuracy_threshold,
                              "grid": _grid_accuracy_threshold}


def _largest_threshold_within_far(distances: np.ndarray, is_same: np.ndarray,
                                  far_target: float) -> float:
    """The largest threshold with FAR ≤ far_target on these pairs (needs a different pair)."""
    thresholds, _, accepted_different = _threshold_sweep(distances, is_same)
    far = accepted_different / accepted_different[-1]
    first_over = np.argmax(far > far_target)  # exists: far[-1] = 1 > far_target
    return float(np.nextafter(thresholds[first_over], -np.inf))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) over the defined (non-NaN) values."""
    defined = np.asarray(values, dtype=np.float64)
    defined = defined[~np.isnan(defined)]
    return float(defined.mean()), float(defined.std())


def _rate(accepted: np.ndarray) -> float:
    """Fraction of True in a bool array; NaN when it is empty (the rate is undefined)."""
    return float(accepted.mean()) if accepted.size else float("nan")


def _check_fold_distances(distances: Any, is_same: Any, folds: Any
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """distances [M] or [F,M] (row f: what fold f's search and scoring use, see
    `fold_distances`), is_same [M], folds [M] -> float64 [F,M] (a 1-D input repeated as a
    view), bool [M], int [M], the F sorted fold ids."""
    same = _bool_vector(is_same, "is_same")
    folds = _check_folds(folds, len(same))
    fold_ids = np.unique(folds)
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim == 2 and d.shape != (len(fold_ids), len(same)):
        raise ValueError(f"per-fold distances must be [folds={len(fold_ids)}, pairs="
                         f"{len(same)}], got shape {d.shape}")
    _check_pairs(d[0] if d.ndim == 2 else d, same)
    if d.ndim == 2:
        _finite_vector(d.ravel(), "distances")
    return (d if d.ndim == 2 else np.broadcast_to(d, (len(fold_ids), len(d))), same, folds,
            fold_ids)


def verification_kfold(distances: Any, is_same: Any, folds: Any, *,
                       threshold_search: str = "exact") -> dict[str, Any]:
    """LFW-protocol k-fold verification accuracy.

    distances [M] (or [F,M], one row per sorted fold id: `fold_distances`), is_same [M] bool,
    folds [M] int (≥ 2 distinct ids). For each fold id (sorted), the threshold is chosen on the
    pairs of all *other* folds: "exact", the smallest one maximising their accuracy (searched
    exactly, see the module docstring); "grid", davidsandberg's grid search. A pair is "same"
    iff distance ≤ threshold; the accuracy is measured on the held fold.

    Returns accuracy (mean of fold accuracies), accuracy_std (population std, ddof=0), threshold
    (mean of the chosen thresholds; -inf if a fold's best is to accept nothing), fold_accuracies
    and fold_thresholds (lists, sorted fold id order), num_folds.
    """
    check_threshold_search(threshold_search)
    d, same, folds, fold_ids = _check_fold_distances(distances, is_same, folds)
    choose = _ACCURACY_THRESHOLD_SEARCH[threshold_search]
    accuracies, thresholds = [], []
    for row, fold in zip(d, fold_ids):
        held = folds == fold
        threshold = choose(row[~held], same[~held])
        accuracies.append(_rate((row[held] <= threshold) == same[held]))
        thresholds.append(threshold)
    accuracy, accuracy_std = _mean_std(accuracies)
    return {"accuracy": accuracy, "accuracy_std": accuracy_std,
            "threshold": float(np.mean(thresholds)), "fold_accuracies": accuracies,
            "fold_thresholds": thresholds, "num_folds": len(fold_ids)}


def val_at_far(distances: Any, is_same: Any, folds: Any, far_target: float) -> dict[str, Any]:
    """VAL (true-accept rate) at a false-accept-rate target, LFW-style over folds.

    distances [M] (or [F,M], as `verification_kfold`), is_same [M] bool, folds [M] int,
    far_target in [0, 1). Per held fold: the
    largest threshold whose FAR on the other folds is ≤ far_target (just below the smallest
    training different-pair distance at which the FAR would pass the target; never 0 as a
    fallback), then on the held fold the TAR (VAL: accepted same pairs / same pairs) and the
    actual FAR (accepted different pairs / different pairs).

    Returns val, val_std, far, far_std (mean and population std over the folds where the rate is
    defined: a fold with no same pair has no VAL, one with no different pair no FAR), threshold
    (mean), fold_vals, fold_fars (NaN where undefined), fold_thresholds.
    """
    if not 0.0 <= far_target < 1.0:
        raise ValueError(f"far_target must be in [0, 1), got {far_target}")
    d, same, folds, fold_ids = _check_fold_distances(distances, is_same, folds)
    vals, fars, thresholds = [], [], []
    for row, fold in zip(d, fold_ids):
        held = folds == fold
        if same[~held].all():
            raise ValueError(f"the folds other than fold {fold} hold no different-identity "
                             "pair, so their FAR is undefined; spread different pairs over "
                             "every fold (e.g. data.generate_pairs)")
        threshold = _largest_threshold_within_far(row[~held], same[~held], far_target)
        accepted = row[held] <= threshold
        vals.append(_rate(accepted[same[held]]))
        fars.append(_rate(accepted[~same[held]]))
        thresholds.append(threshold)
    val, val_std = _mean_std(vals)
    far, far_std = _mean_std(fars)
    return {"val": val, "val_std": val_std, "far": far, "far_std": far_std,
            "threshold": float(np.mean(thresholds)), "fold_vals": vals, "fold_fars": fars,
            "fold_thresholds": thresholds}


def fold_distances(embeddings: Any, first: Any, second: Any, folds: Any, distance: str, *,
                   subtract_mean: bool = False) -> np.ndarray:
    """Pair distances as the k-fold protocol uses them: without subtract_mean, `pair_distances`
    [M]; with it, [F,M], row f (sorted fold ids) computed after subtracting from every embedding
    the mean of the pair embeddings outside fold f: each such pair's first and second embedding,
    an image counted once per pair it is in, the embeddings as given (no normalisation before
    or after), as davidsandberg's `calculate_roc` does.

    embeddings [N,D], first [M], second [M] row indices, folds [M] int.
    """
    if not subtract_mean:
        return pair_distances(embeddings, first, second, distance)
    check_eval_distance(distance)
    a, b = _pair_rows(embeddings, first, second)
    folds = _check_folds(folds, len(a))
    rows = []
    for fold in np.unique(folds):
        training = folds != fold
        mean = (a[training].sum(axis=0) + b[training].sum(axis=0)) / (2 * training.sum())
        rows.append(_row_distances(a - mean, b - mean, distance))
    return np.stack(rows)


def held_out_distances(distances: Any, folds: Any) -> np.ndarray:
    """Each pair's distance as its own held fold is scored: distances [F,M] (`fold_distances`,
    rows in sorted fold-id order), folds [M] -> [M]; a 1-D [M] is returned as it is."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim == 1:
        return d
    folds = np.asarray(folds)
    held = folds[None, :] == np.unique(folds)[:, None]  # [F, M], one True per column
    return d[held.argmax(axis=0), np.arange(d.shape[1])]


def unbalanced_folds(is_same: Any, folds: Any) -> list[int]:
    """The folds (1-based, in sorted fold-id order, as LFW numbers them) holding only same or
    only different pairs: is_same [M] bool, folds [M] int. Consecutive-pair folds of a pairs
    file or `.bin` set ordered by kind produce them; their accuracy then measures one error
    rate alone and skews the mean."""
    same = _bool_vector(is_same, "is_same")
    folds = np.asarray(folds)
    return [k + 1 for k, fold in enumerate(np.unique(folds))
            if len(np.unique(same[folds == fold])) < 2]


def verification_at_threshold(distances: Any, is_same: Any, threshold: float) -> dict[str, Any]:
    """Verification at a threshold chosen elsewhere (a validation split, a given number): no
    folds needed, so it scores a single-fold pairs file or one fold of a multi-fold file.

    distances [M], is_same [M] bool (both kinds present). A pair is accepted iff distance ≤
    threshold. Returns accuracy, tar (accepted same / same pairs), far (accepted different /
    different pairs), threshold, num_pairs.
    """
    d, same = _check_pairs(distances, is_same)
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    accepted = d <= threshold
    return {"accuracy": _rate(accepted == same), "tar": _rate(accepted[same]),
            "far": _rate(accepted[~same]), "threshold": threshold, "num_pairs": int(len(d))}


def val_on_roc(distances: Any, is_same: Any, far_target: float) -> float:
    """VAL read off these pairs' own ROC: the TAR at the largest threshold whose FAR on these
    same pairs is ≤ far_target (distances [M], is_same [M] bool with a different pair).

    The threshold is chosen on the scored pairs themselves, so like the AUC this describes the
    curve, not an operating point chosen beforehand; with D different pairs and D × far_target
    < 1 it is the TAR at which no different pair is accepted.
    """
    d, same = _check_pairs(distances, is_same)
    threshold = _largest_threshold_within_far(d, same, far_target)
    return _rate(d[same] <= threshold)


def far_resolution(is_same: Any, folds: Any) -> int:
    """The fewest different-identity pairs that the training folds of any held fold hold
    (is_same [M] bool, folds [M] int): a FAR target below 1 / this is not resolved by the
    threshold search (one accepted different pair already exceeds it), so VAL there says only
    that no training different pair was accepted."""
    same = _bool_vector(is_same, "is_same")
    folds = _check_folds(folds, len(same))
    return min(int(np.sum(~same[folds != fold])) for fold in np.unique(folds))


def val_resolution(is_same: Any, folds: Any) -> dict[str, bool]:
    """{"val@far=T_resolved": ...} per VAL_FAR_TARGETS: False when some fold's training folds
    hold fewer than 1/T different pairs (`far_resolution`), so that VAL@FAR=T is the TAR at
    which no training different pair is accepted and its held-out FAR can be far above T."""
    resolution = far_resolution(is_same, folds)
    return {f"val@far={name}_resolved": resolution * target >= 1
            for name, target in VAL_FAR_TARGETS.items()}


def pair_counts(labels: Any, first: Any, second: Any, is_same: Any) -> dict[str, int]:
    """What a threshold chosen on these pairs rests on: {"num_pair_identities": identities
    among the paired images, "num_different_pairs"} (labels [N], first/second [M] row
    indices, is_same [M])."""
    labels = np.asarray(labels)
    paired = labels[np.concatenate([np.asarray(first), np.asarray(second)])]
    return {"num_pair_identities": int(len(np.unique(paired))),
            "num_different_pairs": int(np.sum(~_bool_vector(is_same, "is_same")))}


def roc_curve(distances: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC over all pairs at every achievable threshold.

    distances [M], is_same [M] bool -> far [T], tar [T], thresholds [T] (ascending; T = number of
    distinct distances + 1). thresholds[0] is just below every distance (far = tar = 0); the last
    is the largest distance (far = tar = 1). far = accepted different / different pairs, tar =
    accepted same / same pairs, "accepted" meaning distance ≤ threshold.
    """
    d, same = _check_pairs(distances, is_same)
    thresholds, accepted_same, accepted_different = _threshold_sweep(d, same)
    return (accepted_different / accepted_different[-1], accepted_same / accepted_same[-1],
            thresholds)


def roc_auc(distances: Any, is_same: Any) -> float:
    """Area under the ROC (trapezoids between achievable thresholds; a tie between a same and a
    different pair counts one half), equal to sklearn.metrics.roc_auc_score(is_same, -distances).
    """
    far, tar, _ = roc_curve(distances, is_same)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def equal_error_rate(distances: Any, is_same: Any) -> tuple[float, float]:
    """(eer, threshold) where FAR = FRR (= 1 − TAR) on the ROC polyline.

    Between the two consecutive achievable thresholds where FAR − FRR changes sign, FAR, FRR and
    the threshold are interpolated linearly (exact at a threshold where they are equal).
    """
    far, tar, thresholds = roc_curve(distances, is_same)
    gap = far - (1.0 - tar)  # rises from -1 (accept nothing) to +1 (accept all)
    i = int(np.argmax(gap >= 0.0))
    if gap[i] == 0.0:
        return float(far[i]), float(thresholds[i])
    weight = -gap[i - 1] / (gap[i] - gap[i - 1])
    eer = far[i - 1] + weight * (far[i] - far[i - 1])
    threshold = thresholds[i - 1] + weight * (thresholds[i] - thresholds[i - 1])
    return float(eer), float(threshold)


# ----------------------------------------------------------------------------------------------
# Retrieval and one-shot identification (chunked over queries).


def _nearest_in_order(d: np.ndarray, k: int) -> np.ndarray:
    """The k nearest columns of each row ordered by (distance, column index).

    d [C,N] float64 (k ≤ N; +inf marks excluded columns, which never rank before finite ones)
    -> int [C,k]. O(C·N) selection (np.partition) plus a sort of the rows' candidates only.
    """
    kth = np.partition(d, k - 1, axis=1)[:, k - 1:k]
    rows, cols = np.nonzero(d <= kth)  # ≥ k per row; more where distances tie the k-th
    order = np.lexsort((cols, d[rows, cols], rows))
    cols = cols[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(d)))[:-1]])
    return cols[starts[:, None] + np.arange(k)]


def has_retrieval_queries(labels: Any) -> bool:
    """Whether some identity has ≥ 2 images (so retrieval has a query and one-shot a probe)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return bool((counts >= 2).any())


def retrieval_metrics(embeddings: Any, labels: Any, *, distance: str = "squared",
                      ks: Sequence[int] = RETRIEVAL_KS, chunk_size: int = 1024
                      ) -> dict[str, Any]:
    """Recall@K, R-precision and MAP@R with every item as a query against all the others.

    embeddings [N,D], labels [N] int. For a query, R = number of *other* items of its label;
    queries with R = 0 are excluded (counted in num_excluded_queries) but stay candidates for
    the others. Each query's candidates are all N − 1 other items, ranked by distance, ties by
    row index. Per query, averaged over queries:
    - recall@k: 1 if any of the min(k, N − 1) nearest has the query's label (Song et al. 2016);
    - r_precision: (same-label items among the R nearest) / R;
    - map@r: (1/R) Σ_{i ≤ R} P(i)·rel(i), P(i) = precision among the i nearest, rel(i) = 1 if the
      i-th nearest has the query's label (Musgrave et al. 2020).
    Memory O(chunk_size × N) (queries in chunks).
    """
    check_eval_distance(distance)
    ks = _check_ks(ks)
    _check_chunk_size(chunk_size)
    emb, labels = _check_embeddings(embeddings, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    relevant_counts = counts[inverse] - 1  # R per item
    queries = np.flatnonzero(relevant_counts > 0)
    if not len(queries):
        raise ValueError(f"no identity among the {len(labels)} items has a second image, so "
                         "retrieval has no query; evaluate a split with ≥ 2 images per identity")
    hits = {k: 0 for k in ks}
    r_precision_sum = map_sum = 0.0
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start:start + chunk_size]
        d = _distances_between(emb[chunk], emb, distance)
        d[np.arange(len(chunk)), chunk] = np.inf  # a query is not its own neighbour
        r = relevant_counts[chunk]
        depth = min(len(emb) - 1, max(max(ks), int(r.max())))
        neighbours = _nearest_in_order(d, depth)
        relevant = labels[neighbours] == labels[chunk][:, None]  # [C, depth]
        for k in ks:
            hits[k] += int(relevant[:, :k].any(axis=1).sum())
        within_r = np.arange(depth)[None, :] < r[:, None]
        relevant_in_r = relevant & within_r
        r_precision_sum += float(np.sum(relevant_in_r.sum(axis=1) / r))
        precision_at = np.cumsum(relevant, axis=1) / np.arange(1, depth + 1)
        map_sum += float(np.sum((precision_at * relevant_in_r).sum(axis=1) / r))
    num_queries = len(queries)
    result: dict[str, Any] = {f"recall@{k}": hits[k] / num_queries for k in ks}
    result.update({"r_precision": r_precision_sum / num_queries, "map@r": map_sum / num_queries,
                   "num_queries": num_queries,
                   "num_excluded_queries": int(len(labels) - num_queries)})
    return result


def enrolment_indices(labels: Any, seed: int) -> np.ndarray:
    """One enrolment row per identity: labels [N] int -> [G] rows, in ascending label order.

    The enrolled image of an identity is its first row in np.random.default_rng(seed)
    .permutation(N) (uniform over its images, deterministic in seed and N).
    """
    labels = np.asarray(labels)
    permutation = np.random.default_rng(seed).permutation(len(labels))
    _, first = np.unique(labels[permutation], return_index=True)
    return permutation[first]


def oneshot_identification(embeddings: Any, labels: Any, *, distance: str = "squared",
                           seed: int = 0, ks: Sequence[int] = ONESHOT_KS,
                           chunk_size: int = 1024) -> dict[str, Any]:
    """Closed-set one-shot identification: top-k accuracy of probes against one image per
    identity.

    embeddings [N,D], labels [N] int. The gallery holds one image per identity (see
    `enrolment_indices`); every other image is a probe. Identities with a single image enrol
    (and compete as wrong answers) but give no probe. A probe scores a top-k hit when its own
    identity's enrolment image ranks among the k nearest gallery images, ties in distance ranked
    by identity label. Returns oneshot_top{k} for each k, num_probes, num_gallery. Memory
    O(chunk_size × G).
    """
    check_eval_distance(distance)
    ks = _check_ks(ks)
    _check_chunk_size(chunk_size)
    emb, labels = _check_embeddings(embeddings, labels)
    gallery = enrolment_indices(labels, seed)
    gallery_labels = labels[gallery]  # ascending
    probes = np.setdiff1d(np.arange(len(labels)), gallery)
    if not len(probes):
        raise ValueError(f"every one of the {len(labels)} images is its identity's only image, "
                         "so there is no probe; evaluate a split with ≥ 2 images per identity")
    hits = {k: 0 for k in ks}
    gallery_position = np.arange(len(gallery))[None, :]
    for start in range(0, len(probes), chunk_size):
        chunk = probes[start:start + chunk_size]
        d = _distances_between(emb[chunk], emb[gallery], distance)  # [C, G]
        true_position = np.searchsorted(gallery_labels, labels[chunk])[:, None]
        d_true = np.take_along_axis(d, true_position, axis=1)
        rank = np.sum((d < d_true) | ((d == d_true) & (gallery_position < true_position)),
                      axis=1)
        for k in ks:
            hits[k] += int(np.sum(rank < k))
    result: dict[str, Any] = {f"oneshot_top{k}": hits[k] / len(probes) for k in ks}
    result.update({"num_probes": int(len(probes)), "num_gallery": int(len(gallery))})
    return result


# ----------------------------------------------------------------------------------------------
# Everything eval.json reports.


def protocol_options(eval_config: Any) -> dict[str, Any]:
    """The k-fold protocol's choices in a run's config.eval, as `evaluate_embeddings`'s keyword
    arguments: distance, subtract_mean, threshold_search."""
    return {"distance": eval_config["distance"], "subtract_mean": eval_config["subtract_mean"],
            "threshold_search": eval_config["threshold_search"]}


def evaluate_embeddings(embeddings: Any, labels: Any, pair_first: Any, pair_second: Any,
                        is_same: Any, folds: Any, *, distance: str = "squared",
                        subtract_mean: bool = False, threshold_search: str = "exact",
                        include_identification: bool = True) -> dict[str, Any]:
    """All eval.json metrics from embeddings [N,D], labels [N] and pairs (first [M], second [M]
    row indices, is_same [M], folds [M]).

    Keys: accuracy, accuracy_std, threshold, val@far=1e-3, val@far=1e-3_std, far@far=1e-3 (and
    the same three for 1e-2), auc, eer, num_pairs, num_folds, unbalanced_folds (see
    `unbalanced_folds`); with include_identification and some identity with ≥ 2 images also
    recall@1, recall@5, recall@10, r_precision, map@r, oneshot_top1, oneshot_top5 (seed 0).
    subtract_mean and threshold_search: see `fold_distances` and `verification_kfold`; the
    accuracy, VAL and the ROC (AUC, EER: on `held_out_distances`) use them, retrieval and
    identification never subtract a mean. Rates are fractions in [0, 1]; values are plain
    Python floats and ints.
    """
    check_eval_distance(distance)
    emb, labels = _check_embeddings(embeddings, labels)
    d = fold_distances(emb, pair_first, pair_second, folds, distance,
                       subtract_mean=subtract_mean)
    verification = verification_kfold(d, is_same, folds, threshold_search=threshold_search)
    result: dict[str, Any] = {key: verification[key]
                              for key in ("accuracy", "accuracy_std", "threshold")}
    for name, target in VAL_FAR_TARGETS.items():
        val = val_at_far(d, is_same, folds, target)
        result.update({f"val@far={name}": val["val"], f"val@far={name}_std": val["val_std"],
                       f"far@far={name}": val["far"]})
    scores = held_out_distances(d, folds)
    result["auc"] = roc_auc(scores, is_same)
    result["eer"] = equal_error_rate(scores, is_same)[0]
    result["num_pairs"] = int(len(scores))
    result["num_folds"] = verification["num_folds"]
    result["unbalanced_folds"] = unbalanced_folds(is_same, folds)
    if include_identification:
        result.update(identification_metrics(emb, labels, distance=distance))
    return result


def identification_metrics(embeddings: Any, labels: Any, *, distance: str = "squared"
                           ) -> dict[str, float]:
    """The eval.json retrieval and one-shot keys (recall@1/5/10, r_precision, map@r,
    oneshot_top1/5, seed 0) of embeddings [N,D] with labels [N]; {} when no identity has 2
    images (no query has a match)."""
    emb, labels = _check_embeddings(embeddings, labels)
    if not has_retrieval_queries(labels):
        return {}
    retrieval = retrieval_metrics(emb, labels, distance=distance, ks=RETRIEVAL_KS)
    oneshot = oneshot_identification(emb, labels, distance=distance, ks=ONESHOT_KS)
    result = {key: retrieval[key] for key in
              (*(f"recall@{k}" for k in RETRIEVAL_KS), "r_precision", "map@r")}
    result.update({f"oneshot_top{k}": oneshot[f"oneshot_top{k}"] for k in ONESHOT_KS})
    return result
