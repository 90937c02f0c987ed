"""Batch samplers: the global batch of a step is a pure function of (seed, step); each process
reads a contiguous slice of it. `PKSampler`: P identities × K images, laid out identity-major
so that any contiguous 1/n of the rows holds whole identities (P/n of them, all K images
each). `UniformSampler` (uniform_sampler.py): every training image once per epoch."""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from facenet_jax.data.augment import Augment
from facenet_jax.data.dataset import Dataset, RowSubset


def validate_batch_layout(identities: int, images_per_identity: int, num_devices: int) -> None:
    """P ≥ 2, K ≥ 2 and whole identities per device (P divisible by the device count)."""
    if identities < 2:
        raise ValueError(f"batch.identities (P) = {identities}: a batch needs at least 2 "
                         "identities to have negatives; set --config.batch.identities >= 2")
    if images_per_identity < 2:
        raise ValueError(f"batch.images_per_identity (K) = {images_per_identity}: with K < 2 "
                         "no anchor has a positive; set --config.batch.images_per_identity >= 2")
    if identities % num_devices:
        lower = multiple_below(identities, num_devices)
        raise ValueError(
            f"batch.identities (P) = {identities} is not divisible by the {num_devices} "
            f"devices; each device must hold whole identities: use P = {lower} or "
            f"{lower + num_devices}")


def multiple_below(value: int, divisor: int) -> int:
    """The largest positive multiple of divisor not above value (divisor itself if none)."""
    return max(divisor, value // divisor * divisor)


class RowSampler(abc.ABC):
    """What every sampler shares: a `plan(step)` of dataset rows and augmentation draws for
    the whole global batch (subclasses), read and augmented per process by `host_batch`."""

    def __init__(self, dataset: Dataset, *, seed: int, num_shards: int,
                 augment: Mapping[str, Any] | Augment | None):
        self.dataset, self.seed, self.num_shards = dataset, seed, num_shards
        self.augment = Augment.from_config(augment)
        if 2 * self.augment.crop_padding >= dataset.image_size:
            raise ValueError(f"data.augment.crop_padding={self.augment.crop_padding} is too "
                             f"large for {dataset.image_size}px images")

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """B, the global batch size."""

    @abc.abstractmethod
    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset rows int [B], crop offsets int [B,2], flips bool [B] of the global batch."""

    @property
    def replaced_images(self) -> int | None:
        """How many unreadable images the batches read so far had replaced by another image
        of their identity (sources decoded on access: packs); None for sources decoded up
        front, whose bad files fail or are skipped before training."""
        return getattr(self._decoded_on_access(), "replaced", None)

    def count_replaced(self, count: int) -> None:
        """Adds replacements made by copies of this sampler (input worker processes)."""
        if count:
            self._decoded_on_access().replaced += count

    def _decoded_on_access(self) -> Any:
        images = self.dataset.images
        return images.base if isinstance(images, RowSubset) else images

    def host_batch(self, step: int, process_index: int, process_count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [i·B/p, (i+1)·B/p) of step's global batch, for process i of p."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.num_shards % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"process {process_index} of {process_count}: the process count "
                             f"must divide num_shards={self.num_shards}")
        rows, offsets, flips = self.plan(step)
        per_process = len(rows) // process_count
        mine = slice(process_index * per_process, (process_index + 1) * per_process)
        images = _read_rows(self.dataset.images, rows[mine])
        images = self.augment.apply(images, offsets[mine], flips[mine])
        return images, self.dataset.labels[rows[mine]]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch of `step`: images uint8 [B,H,W,3], labels int32 [B]."""
        return self.host_batch(step, 0, 1)


class PKSampler(RowSampler):
    """Batches of P identities × K images (uint8 [P*K,H,W,3], int32 labels [P*K]).

    Identities are drawn without replacement among those with at least 2 images; images
    without replacement, or with replacement for identities holding fewer than K images
    (then a batch repeats images: duplicates the losses handle). Augmentation draws come from
    the same per-step stream, for the whole global batch, so the batch does not depend on
    num_shards or the process count: only which rows each shard or process holds.
    """

    def __init__(self, dataset: Dataset, *, identities: int, images_per_identity: int,
                 seed: int, num_shards: int = 1,
                 augment: Mapping[str, Any] | Augment | None = None):
        validate_batch_layout(identities, images_per_identity, num_shards)
        counts = dataset.counts()
        self.trainable = np.flatnonzero(counts >= 2)
        if len(self.trainable) < len(counts):
            logging.info("sampler: %d identities with fewer than 2 images are not sampled",
                         len(counts) - len(self.trainable))
        if identities > len(self.trainable):
            raise ValueError(
                f"batch.identities (P) = {identities} exceeds the {len(self.trainable)} "
                "trainable identities (2 or more images) of the training split; lower "
                f"--config.batch.identities to at most {len(self.trainable)} (and a multiple "
                f"of the {num_shards} devices) or use more training identities")
        super().__init__(dataset, seed=seed, num_shards=num_shards, augment=augment)
        self.identities, self.images_per_identity = identities, images_per_identity
        order = np.argsort(dataset.labels, kind="stable")
        self._rows_by_identity = np.split(order, np.cumsum(counts)[:-1])

    @property
    def batch_size(self) -> int:
        return self.identities * self.images_per_identity

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset rows int [B], crop offsets int [B,2], flips bool [B] of the global batch."""
        rng = np.random.default_rng([self.seed, 0x9C5, step])
        chosen = rng.choice(self.trainable, self.identities, replace=False)
        k = self.images_per_identity
        rows = np.concatenate([
            rng.choice(self._rows_by_identity[i], k, replace=len(self._rows_by_identity[i]) < k)
            for i in chosen])
        offsets, flips = self.augment.draw(rng, len(rows))
        return rows, offsets, flips


def _read_rows(images: Any, rows: np.ndarray) -> np.ndarray:
    """Gathers rows, reading a memory map in ascending order (sequential on disk)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *images.shape[1:]), np.uint8)
    out[order] = images[rows[order]]
    return out
