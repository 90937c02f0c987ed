"""The collapse rule: one implementation for the train loop (a warning while training) and the
sweeps (a column of the results table).

Over the last `COLLAPSE_WINDOW` training log rows (each the mean of `log_every` steps), either
- every row has embedding_spread (mean pairwise distance of the batch, in the loss's distance)
  below the larger of
  * the spread of points `COLLAPSE_RADIUS` = 0.1 apart on the unit sphere (about 6°): 0.01
    squared, 0.1 euclidean, 0.005 cosine, the same geometry in each distance; trained or not,
    unit-norm embeddings of different faces sit O(1) apart (0.3–2 squared here), and
  * α/10 (hinge only): with the batch's distances around α/10 or less, a typical triplet costs
    about α whatever its faces, so the loss only sees α;
  a 200-step batch-hard run of experiments/default.py measured here ended at spread 0.0055
  squared (radius ≈ 0.07), identical for α = 0.05, 0.2 and 1.0; or
- every row has its loss within `COLLAPSE_LOSS_RTOL` × pinned of the pinned value, where
  pinned = α for the hinge (all distances 0 ⇒ every triplet costs exactly α) and ln 2 with the
  soft margin (softplus(0)).
A collapsed embedding can still order some pairs correctly (verification picks its threshold at
any scale), so a collapsed run may score well above chance: the flag says how it got there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

COLLAPSE_WINDOW = 3
COLLAPSE_RADIUS = 0.1
COLLAPSE_SPREAD_OF_MARGIN = 0.1
COLLAPSE_LOSS_RTOL = 1e-2
# What to try, printed with the train loop's warning (docs/outputs_and_verification.md has the
# measurements behind it).
COLLAPSE_ADVICE = ("try loss.strategy=semihard, or keep hardest but start it after a semi-hard "
                   "warm-up (loss.warmup_strategy=semihard loss.warmup_steps=N; N = half of "
                   "num_steps trained on Yale B), or loss.soft=True with "
                   "loss.distance=euclidean")


def is_collapsed(train_rows: Sequence[Mapping[str, Any]], *, margin: float, distance: str,
                 soft: bool) -> bool | None:
    """The collapse rule of the module docstring over the last training log rows (dicts with
    "loss" and "embedding_spread"); None when there are no rows to judge."""
    window = [row for row in train_rows if row.get("loss") is not None][-COLLAPSE_WINDOW:]
    if not window:
        return None
    pinned = math.log(2.0) if soft else float(margin)
    spread_floor = collapse_spread(margin=margin, distance=distance, soft=soft)
    spread_gone = all(row.get("embedding_spread") is not None
                      and row["embedding_spread"] < spread_floor for row in window)
    loss_pinned = pinned > 0 and all(
        abs(row["loss"] - pinned) <= COLLAPSE_LOSS_RTOL * pinned for row in window)
    return spread_gone or loss_pinned


def collapse_spread(*, margin: float, distance: str, soft: bool) -> float:
    """The embedding spread below which the collapse rule calls a log row collapsed: unit
    vectors `COLLAPSE_RADIUS` apart in `distance`, or α/10 with the hinge if larger."""
    radius = {"squared": COLLAPSE_RADIUS ** 2, "euclidean": COLLAPSE_RADIUS,
              "cosine": COLLAPSE_RADIUS ** 2 / 2}  # cosine distance 1 - cos = ||u - v||² / 2
    if distance not in radius:  # local import: the sweep's aggregation runs without JAX
        from facenet_jax.losses.distances import check_distance
        check_distance(distance, "loss.distance")
    return radius[distance] if soft else max(radius[distance], COLLAPSE_SPREAD_OF_MARGIN * margin)


def collapse_warning(train_rows: Sequence[Mapping[str, Any]], *, step: int, margin: float,
                     distance: str, soft: bool) -> str | None:
    """The train loop's one-time warning text when the rule fires on `train_rows` (the log rows
    so far, newest last), else None. Unlike a finished sweep cell, judged on whatever rows it
    has, a run in progress is judged only once it has a full window of rows."""
    if (len(train_rows) < COLLAPSE_WINDOW
            or not is_collapsed(train_rows, margin=margin, distance=distance, soft=soft)):
        return None
    last = train_rows[-1]
    floor = collapse_spread(margin=margin, distance=distance, soft=soft)
    return (f"the embedding has collapsed by step {step}: over the last {COLLAPSE_WINDOW} log "
            f"rows the embedding spread is {last.get('embedding_spread', float('nan')):.4f} "
            f"({distance}; collapsed below {floor:g}) and the loss {last['loss']:.4f} "
            f"(pinned value {'ln 2' if soft else f'α = {margin:g}'}); no collapsed run here "
            f"recovered. {COLLAPSE_ADVICE[0].upper()}{COLLAPSE_ADVICE[1:]}.")


# The spread-only rule's floor: unit vectors COLLAPSE_RADIUS apart, in squared distance (the
# distance a classification run's embedding_spread is logged in).
SPREAD_COLLAPSE_FLOOR = COLLAPSE_RADIUS ** 2


def is_spread_collapsed(train_rows: Sequence[Mapping[str, Any]]) -> bool | None:
    """The collapse rule of a classification or combined objective: the spread half of the
    rule alone (embedding_spread, squared distance, below the spread of unit vectors
    `COLLAPSE_RADIUS` apart, on every row of the last window). A margin-softmax loss has no
    pinned value (it depends on the centres, the scale s and the margin m), so only the spread
    judges. None when there are no rows to judge."""
    window = [row for row in train_rows if row.get("loss") is not None][-COLLAPSE_WINDOW:]
    if not window:
        return None
    return all(row.get("embedding_spread") is not None
               and row["embedding_spread"] < SPREAD_COLLAPSE_FLOOR for row in window)


def spread_collapse_warning(train_rows: Sequence[Mapping[str, Any]], *,
                            step: int) -> str | None:
    """The train loop's warning for a classification or combined objective when
    `is_spread_collapsed` fires on a full window of `train_rows`, else None."""
    window = [row for row in train_rows if row.get("loss") is not None][-COLLAPSE_WINDOW:]
    if len(window) < COLLAPSE_WINDOW or not is_spread_collapsed(window):
        return None
    return (f"the embedding has collapsed by step {step}: over the last {COLLAPSE_WINDOW} log "
            f"rows the embedding spread is {window[-1]['embedding_spread']:.4f} (squared; "
            f"collapsed below {SPREAD_COLLAPSE_FLOOR:g}). Try a lower learning rate or, for a margin head, a "
            "smaller loss.classification.margin or scale.")
