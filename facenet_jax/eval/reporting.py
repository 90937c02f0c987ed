"""How evaluation numbers are shown in summaries and tables: one rule each, so every command
(evaluate, the `.bin` sets, crossval, sweeps) says the same thing.

- A VAL@FAR whose threshold was chosen on fewer than 1/FAR different pairs is not resolved
  (`metrics.far_resolution`; the result's `<key>_resolved` is False): FAR ≤ target there only
  means "no different pair accepted", and the held-out FAR can be far above the target. It is
  shown with UNRESOLVED_MARK and `unresolved_note` under the table.
- A spread across runs (crossval folds, sweep seeds) is the sample std (ddof = 1), shown as
  "mean ± sample std"; one run is "mean (n=1)", never "± 0". The std over the folds *within*
  one evaluation stays the population std (ddof = 0), as facenet and insightface report it
  (`metrics.verification_kfold`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

UNRESOLVED_MARK = "*"


def unresolved(result: Mapping[str, Any], key: str) -> bool:
    """Whether `result[key]` (e.g. "val@far=1e-3") is flagged unresolved; a result without the
    flag (none recorded) is not."""
    return result.get(f"{key}_resolved") is False


def unresolved_note(target: str = "FAR") -> str:
    """The footnote for UNRESOLVED_MARK (markdown, the mark escaped)."""
    return (f"\\{UNRESOLVED_MARK} unresolved: the threshold was chosen on fewer than "
            f"1/{target} different pairs, so FAR ≤ {target} there means no different pair "
            "accepted; the actual FAR can be far above the target.")


def sample_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (ddof = 1) of values: the spread one more run would
    show; None below 2 values (undefined)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_spread(mean: float | None, std: float | None, n: int, fmt: str = ".4f") -> str:
    """"0.7400 ± 0.0123" (mean ± sample std over n ≥ 2 runs), "0.7400 (n=1)", or "n/a" when
    no run has the number."""
    if mean is None or n < 1:
        return "n/a"
    if n == 1 or std is None:
        return f"{mean:{fmt}} (n={n})"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def warn_unbalanced_folds(result: Mapping[str, Any], source: str | None = None) -> None:
    """Logs a k-fold result's `unbalanced_folds` (folds of only same or only different pairs),
    prefixed by `source` (e.g. a `.bin` set's name) when given; nothing when there are none."""
    if result["unbalanced_folds"]:
        logging.warning("%sfolds %s hold only same or only different pairs: their accuracy "
                        "measures one error rate alone and skews the mean",
                        f"{source}: " if source else "", result["unbalanced_folds"])
