"""Files in, verdict out: are two face images the same person, by a trained run?

    python -m facenet_jax.verify DIR IMG_A IMG_B [--threshold T]

Prints the distance between the two images' embeddings (in the run's eval.distance), the
threshold it is compared with (by default the run's, chosen on its validation split; see
`Encoder.threshold_info`) and the verdict: "same person" iff distance ≤ threshold. The images
are decoded and preprocessed as the run's data config says (`Encoder.embed_files`); a run
trained on aligned crops (data.alignment) says that its inputs must be such crops.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from facenet_jax.cli import cli_logging

USAGE = "usage: python -m facenet_jax.verify DIR IMG_A IMG_B [--threshold T]"


def alignment_note(config: ml_collections.ConfigDict) -> str | None:
    """What a run trained on aligned crops (data.alignment set) asks of its inputs, else
    None."""
    mode = config.data.get("alignment")
    if mode is None:
        return None
    return (f"note: this run was trained on {mode!r}-aligned crops (data.alignment), so IMG_A "
            f"and IMG_B must be such crops (python -m facenet_jax.align --mode {mode}), not raw "
            "photos")


def verdict_lines(distance: float, same: bool, threshold: float, distance_kind: str,
                  chosen: dict[str, Any] | None) -> list[str]:
    """The CLI's report: distance, threshold (and where it was chosen: `chosen` is
    `Encoder.threshold_info`, None for a threshold given on the command line), verdict."""
    where = ("given on the command line" if chosen is None else
             f"the run's, chosen on its {chosen['split']} split at step {chosen['step']}")
    return [f"distance   {distance:.4f} ({distance_kind})",
            f"threshold  {threshold:.4f} ({where})",
            f"verdict    {'same person' if same else 'different people'}"]


def verify_pair(workdir: str | pathlib.Path, image_a: str | pathlib.Path,
                image_b: str | pathlib.Path, threshold: float | None = None) -> list[str]:
    """The CLI's work: the lines it prints for IMG_A and IMG_B by the run in `workdir`. The
    files and the threshold are checked before the model is loaded."""
    for path in (image_a, image_b):
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"--threshold {threshold}: give a finite number in the run's "
                         "eval.distance")
    from facenet_jax.eval.embed import load_encoder  # jax only once the inputs are known good

    encoder = load_encoder(workdir)
    chosen = encoder.threshold_info if threshold is None else None
    if chosen is not None:
        threshold = chosen["threshold"]
    embeddings = encoder.embed_files([image_a, image_b])
    distance = float(encoder.distance(embeddings[0], embeddings[1])[0])
    same = bool(encoder.verify(embeddings[0], embeddings[1], threshold)[0])
    note = alignment_note(encoder.config)
    return ([note] if note else []) + verdict_lines(
        distance, same, threshold, encoder.config.eval.distance, chosen)


def main(argv: list[str]) -> None:
    from absl import flags

    cli_logging()
    if len(argv) != 4:
        raise ValueError(USAGE)
    print("\n".join(verify_pair(*argv[1:], threshold=flags.FLAGS.threshold)), flush=True)


def define_flags() -> None:
    """The flags of `python -m facenet_jax.verify` (absl), defined once by that module."""
    from absl import flags

    flags.DEFINE_float("threshold", None, "compare with this threshold (in the run's "
                       "eval.distance) instead of the run's own")
