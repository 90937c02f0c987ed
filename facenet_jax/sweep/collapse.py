"""The collapse rule of a training log (kept in one place: the sweep tables and plots flag it).

Collapse rule (`is_collapsed`): over the last `COLLAPSE_WINDOW` training log rows (each the mean
of `log_every` steps), either
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
any scale), so a collapsed cell may score well above chance: the flag says how it got there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

COLLAPSE_WINDOW = 3
COLLAPSE_RADIUS = 0.1
COLLAPSE_SPREAD_OF_MARGIN = 0.1
COLLAPSE_LOSS_RTOL = 1e-2


def is_collapsed(train_rows: Sequence[Mapping[str, Any]], *, margin: float, distance: str,
                 soft: bool) -> bool | None:
    """The collapse rule of the module docstring over the last training log rows; None when
    there are no rows to judge."""
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
    if distance not in radius:
        raise ValueError(f"unknown loss.distance {distance!r}; expected one of {sorted(radius)}")
    return radius[distance] if soft else max(radius[distance], COLLAPSE_SPREAD_OF_MARGIN * margin)
