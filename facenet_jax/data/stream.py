"""Host batches built in worker processes (`data.pipeline = "stream"`): each step's batch —
decode, crop/flip, stacking — is `sampler.host_batch(step, ...)` run whole in one of
`data.workers` processes (grain's `mp_prefetch`, the `stream` extra), handed back in order.

The batch of a step is a pure function of (seed, step), so the stream is the same for any
worker count and a resumed run (which streams from its restored step) draws what an
uninterrupted one would. With 0 workers the batches are built by the background thread of
`prefetch`, as for cached sources. Sources decoded up front (synthetic, tfds, a folder's
memory-mapped cache) never stream: there is nothing left for workers to do; a folder streams
when asked (data.pipeline="stream": its files decoded per batch, no cache).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from facenet_jax.data.prefetch import prefetch
from facenet_jax.data.sampler import RowSampler

PIPELINES = ("cache", "stream")
STREAMING_SOURCES = ("rec", "folder")  # sources that can decode as batches read them
MAX_DEFAULT_WORKERS = 16
_INSTALL = "pip install '.[stream]'  (grain, simplejpeg)"


class InputWorkerError(RuntimeError):
    """A worker process of the input pipeline died (killed, out of memory, a crash)."""


def pipeline_of(data_config: Any) -> str:
    """config.data.pipeline, or the source's own: "stream" for packs (decoded per batch),
    "cache" for everything else (decoded once, as before the key existed); folders do both.
    ValueError for an unknown pipeline, a pack asked to cache, or a source decoded up front
    (synthetic, tfds) asked to stream."""
    pipeline = data_config.get("pipeline")
    if pipeline is None:
        return "stream" if data_config.source == "rec" else "cache"
    if pipeline not in PIPELINES:
        raise ValueError(f"data.pipeline must be one of {PIPELINES} (or unset: the source's "
                         f"own), got {pipeline!r}")
    if data_config.source == "rec" and pipeline != "stream":
        raise ValueError("data.source='rec' always streams (a decoded cache of a pack is "
                         "hundreds of GB): drop data.pipeline or set it to 'stream'")
    if data_config.source not in STREAMING_SOURCES and pipeline == "stream":
        raise ValueError(f"data.pipeline='stream' needs a source decoded per batch "
                         f"({', '.join(STREAMING_SOURCES)}); data.source="
                         f"{data_config.source!r} is decoded once: drop data.pipeline")
    return pipeline


def worker_count(data_config: Any) -> int:
    """config.data.workers, or by default the host's cores less one (the training process),
    at most 16, when grain is installed, else 0 (batches in a thread, a logged hint).
    ImportError for workers asked for without grain."""
    workers = data_config.get("workers")
    if workers is not None:
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"data.workers must be an integer >= 0, got {workers!r}")
        if workers and not grain_installed():  # now, not after the step has compiled
            raise ImportError(f"data.workers={workers} needs grain: {_INSTALL}, or set "
                              "data.workers=0 (batches built in a thread)")
        return workers
    if not grain_installed():
        logging.warning("data.pipeline='stream' builds batches in a thread: install the stream "
                        "extra for worker processes: %s", _INSTALL)
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 2) - 1))


def grain_installed() -> bool:
    try:
        import grain  # noqa: F401
    except ImportError:
        return False
    return True


class _HostBatch:
    """One step's host batch and how many unreadable images it replaced (a picklable map
    function: it runs in the workers, each holding its own copy of the sampler, whose count
    only that worker changes)."""

    def __init__(self, sampler: RowSampler, process_index: int, process_count: int):
        self.sampler, self.process_index, self.process_count = (sampler, process_index,
                                                                process_count)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before = self.sampler.replaced_images or 0
        images, labels = self.sampler.host_batch(int(step), self.process_index,
                                                 self.process_count)
        return images, labels, np.int64((self.sampler.replaced_images or 0) - before)


def stream_host_batches(sampler: RowSampler, steps: range, process_index: int,
                        process_count: int, *, workers: int, buffer_size: int
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """host_batch(s, process_index, process_count) for s in steps, in order, built by
    `workers` processes (0: a background thread), each up to `buffer_size` batches ahead.
    Replacements made in the workers are added to the sampler's count (`replaced_images`).
    A worker that dies is an InputWorkerError naming the step it was building."""
    if workers == 0:  # this process's sampler counts its replacements itself
        yield from prefetch((sampler.host_batch(s, process_index, process_count)
                             for s in steps), buffer_size)
        return
    build = _HostBatch(sampler, process_index, process_count)
    for images, labels, replaced in _grain_batches(build, steps, workers, buffer_size):
        sampler.count_replaced(int(replaced))
        yield images, labels


def _grain_batches(build: _HostBatch, steps: range, workers: int, buffer_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    try:
        import grain
    except ImportError as error:
        raise ImportError(f"data.workers={workers} needs grain ({error}): {_INSTALL}, or set "
                          "data.workers=0 (batches built in a thread)") from error
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags' defaults
        flags.FLAGS.mark_as_parsed()
    dataset = (grain.MapDataset.range(steps.start, steps.stop, steps.step).map(build)
               .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
               .mp_prefetch(grain.MultiprocessingOptions(
                   num_workers=workers, per_worker_buffer_size=max(1, buffer_size // workers))))
    iterator = iter(dataset)
    step = steps.start
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:
                if "terminated unexpectedly" not in str(error):
                    raise
                raise InputWorkerError(
                    f"an input worker process died while building the batches from step "
                    f"{step} on ({error}). Out of memory is the usual cause (check the kernel "
                    "log: dmesg); lower data.workers, or set data.workers=0 to build batches "
                    "in this process and see the error itself. Re-running the same command "
                    "resumes from the last checkpoint with the same batches") from None
            step += steps.step
            yield batch
    finally:
        iterator.close()
