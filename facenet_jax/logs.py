"""Run logs: `metrics.jsonl` (one JSON object per line) and TensorBoard events (no TensorFlow).

Only process 0 writes. Non-finite values become `null`. After a resume, lines past the restored
step are dropped first (atomically: write aside, rename), so each step appears once.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

# The command lines' shared edges live in facenet_jax.cli; these names stay importable here.
from facenet_jax.cli import TRACEBACK_ENV, USER_ERRORS, cli_logging, one_line_user_errors  # noqa: F401
from facenet_jax.config import json_safe
from facenet_jax.runfiles import METRICS_FILE, TENSORBOARD_DIR, atomic_write_text


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """All rows of DIR/metrics.jsonl (a torn last line from a killed process is skipped)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _keep_metric_rows(workdir: str | pathlib.Path,
                      keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrites DIR/metrics.jsonl with the rows `keep` accepts (a torn last line dropped)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    kept = [row for row in read_metrics(workdir) if keep(row)]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def drop_metric_rows(workdir: str | pathlib.Path, step: int, prefix: str) -> None:
    """Drops the rows at `step` holding PREFIX/ keys: an evaluation about to be logged again
    at that step (a finished run re-run to re-score it) replaces its earlier row."""
    _keep_metric_rows(workdir, lambda row: not (row.get("step") == step and any(
        key.startswith(f"{prefix}/") for key in row)))


def truncate_metrics(workdir: str | pathlib.Path, last_step: int) -> None:
    """Keeps only rows with step ≤ last_step (and drops a torn last line)."""
    _keep_metric_rows(workdir, lambda row: row.get("step", 0) <= last_step)


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter (event files without TensorFlow), imported without torch.

    tensorboardX imports torch at module level when it is installed (the `[pretrained]` extra),
    only to accept torch tensors, which nothing here passes: 1.3 s of every run's start-up.
    A torch already imported is left as it is."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True,
                 purge_step: int | None = None):
        """`purge_step`: on a resume, the first step this run logs; TensorBoard then hides
        events of earlier attempts at that step or later (metrics.jsonl is truncated apart)."""
        self._enabled = enabled
        self._path = pathlib.Path(workdir) / METRICS_FILE
        self._tensorboard = None
        if enabled:
            self._tensorboard = _summary_writer_class()(
                str(pathlib.Path(workdir) / TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self._enabled:
            return
        row = json_safe({"step": int(step), **values})
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(tensorboard_tag(key), value, step)

    def write_images(self, step: int, images: Mapping[str, str | pathlib.Path]) -> None:
        """Adds PNG files (e.g. an evaluation's figures) to TensorBoard's Images tab, one tag
        each; metrics.jsonl is for numbers and gets nothing."""
        if not self._enabled:
            return
        import matplotlib.image

        for tag, path in images.items():
            pixels = matplotlib.image.imread(str(path))  # float [H, W, 3 or 4] in [0, 1]
            self._tensorboard.add_image(tensorboard_tag(tag), pixels[..., :3], step,
                                        dataformats="HWC")

    def flush(self) -> None:
        """Puts TensorBoard's buffered events on disk (it buffers up to two minutes)."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()
            self._tensorboard.close()


def tensorboard_tag(key: str) -> str:
    """`eval/val@far=1e-3` -> `eval/val_far_1e-3`: TensorBoard tags allow [A-Za-z0-9_./-] only
    (tensorboardX renames anything else itself, logging a line per name)."""
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", key)
