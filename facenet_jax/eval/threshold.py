"""The verification threshold a trained run chose (on its validation split at the last step),
read back from its evaluation files: what `verify`, `Encoder.verify`, fixed-threshold scoring and
cross-validation compare distances with."""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from facenet_jax.runfiles import EVAL_FILE, VALIDATION_EVAL_FILE

# Below these, a threshold says more about the few people it was chosen on than about the next
# ones (an ORL run's came from 4 people and accepted a quarter of different pairs).
MIN_THRESHOLD_IDENTITIES = 20
MIN_THRESHOLD_DIFFERENT_PAIRS = 200


def threshold_warning(num_identities: int | None, num_different_pairs: int | None
                      ) -> str | None:
    """A warning when a threshold was chosen on fewer than MIN_THRESHOLD_IDENTITIES identities
    or MIN_THRESHOLD_DIFFERENT_PAIRS different pairs, else None (also when not recorded)."""
    few = [f"{count} {what} (fewer than {minimum})" for count, what, minimum in (
        (num_identities, "identities", MIN_THRESHOLD_IDENTITIES),
        (num_different_pairs, "different pairs", MIN_THRESHOLD_DIFFERENT_PAIRS))
        if count is not None and count < minimum]
    if not few:
        return None
    return (f"the threshold was chosen on {' and '.join(few)}: its false-accept rate on other "
            "people is barely estimated; give the run a larger validation split "
            "(data.split.validation) or choose one yourself (--threshold T; "
            "verify(a, b, threshold=t))")


def run_threshold(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The verification threshold a run chose, with what it was chosen on.

    From DIR/eval_validation.json (the k-fold threshold on the run's validation pairs at the
    last step), else DIR/eval.json (runs without a validation split: chosen on the test
    split, said so). Returns {"threshold", "distance", "split", "step",
    "source", "num_identities", "num_pairs", "num_different_pairs" (None where the file does
    not record them), "warning" (`threshold_warning`: logged too)}; FileNotFoundError when the
    run has neither (it never finished).
    """
    workdir = pathlib.Path(workdir)
    for name in (VALIDATION_EVAL_FILE, EVAL_FILE):
        path = workdir / name
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("threshold") is not None and "split" in saved:
                if (saved.get("config") or {}).get("eval", {}).get("subtract_mean"):
                    raise ValueError(
                        f"{path}'s threshold was chosen on mean-subtracted embeddings "
                        "(eval.subtract_mean=True), which fixed-threshold scoring and verify "
                        f"never use: re-evaluate (evaluate --workdir {workdir} --split "
                        f"{saved['split']} --config.eval.subtract_mean=False --output {path}) "
                        "or pass a threshold")
                counts = {"num_identities": saved.get("num_pair_identities"),
                          "num_pairs": saved.get("num_pairs"),
                          "num_different_pairs": saved.get("num_different_pairs")}
                warning = threshold_warning(counts["num_identities"],
                                            counts["num_different_pairs"])
                if warning:
                    logging.warning("%s: %s", path, warning)
                return {"threshold": float(saved["threshold"]), "distance": saved["distance"],
                        "split": saved["split"], "step": saved.get("step"), "source": str(path),
                        **counts, "warning": warning}
    raise FileNotFoundError(
        f"{workdir} holds no {VALIDATION_EVAL_FILE} or {EVAL_FILE} with a threshold (the run "
        "has not finished); pass a threshold explicitly (--threshold T)")
