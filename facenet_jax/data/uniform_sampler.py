"""The uniform sampler: every training image once per epoch, in a per-epoch random order, for
losses that learn from every image (classification) rather than from P×K structure."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from facenet_jax.data.augment import Augment
from facenet_jax.data.dataset import Dataset
from facenet_jax.data.sampler import RowSampler, multiple_below

# Stream tags: an epoch's order and a step's augmentation come from different streams, so
# epoch e and step e never share random numbers.
_EPOCH_STREAM, _STEP_STREAM = 0x0E9C, 0x57E9


def validate_uniform_batch(batch_size: int, num_devices: int) -> None:
    """The uniform sampler's batch (P×K, only a size there): >= 1 and split evenly over the
    devices. No K >= 2 rule: its batches carry no identity structure anyway."""
    if batch_size < 1:
        raise ValueError(f"the uniform sampler's batch size batch.identities × "
                         f"batch.images_per_identity = {batch_size} must be >= 1")
    if batch_size % num_devices:
        lower = multiple_below(batch_size, num_devices)
        raise ValueError(
            f"the uniform sampler's batch size batch.identities × batch.images_per_identity "
            f"= {batch_size} is not divisible by the {num_devices} devices; make the product "
            f"{lower} or {lower + num_devices} (e.g. --config.batch.images_per_identity=1 "
            f"--config.batch.identities={lower})")


class UniformSampler(RowSampler):
    """Batches of B images drawn without replacement within each epoch (uint8 [B,H,W,3],
    int32 labels [B]: the dataset's identity ids).

    Epoch e's order is a permutation of all N rows drawn from (seed, e); the epochs are
    concatenated into one stream and step s takes its positions [s·B, (s+1)·B), so a batch
    may end one epoch and start the next, and every image appears exactly once per epoch.
    When N < B one batch spans several epochs (an image then appears more than once in it).
    A step costs O(B) plus one O(N) permutation per epoch it touches; the permutations of the
    epochs the last step touched are kept, so a run computes each about once.

    The global batch (augmentation included) depends only on (seed, step): any device or
    process count sees the same batch, each process a contiguous 1/p of it. The rows carry no
    identity structure: an identity may have one image in a batch or none, so a triplet loss
    on these batches has fewer positive pairs (anchors without one contribute nothing).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, num_shards: int = 1,
                 augment: Mapping[str, Any] | Augment | None = None):
        validate_uniform_batch(batch_size, num_shards)
        if len(dataset.labels) == 0:
            raise ValueError("the uniform sampler got an empty training split; check "
                             "data.split.* and the data source")
        super().__init__(dataset, seed=seed, num_shards=num_shards, augment=augment)
        self._batch_size = batch_size
        if len(dataset.labels) < batch_size:
            logging.info("sampler: the %d training images are fewer than the batch of %d: "
                         "each batch spans several epochs", len(dataset.labels), batch_size)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order: a permutation int64 [N] of the dataset's rows."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch])
            order = rng.permutation(len(self.dataset.labels))
        return order

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset rows int [B], crop offsets int [B,2], flips bool [B] of the global batch."""
        n, size = len(self.dataset.labels), self._batch_size
        start = step * size
        first, last = start // n, (start + size - 1) // n
        orders = {e: self.epoch_order(e) for e in range(first, last + 1)}
        self._orders = orders  # one assignment: the next step usually reuses them
        # The stream positions [start, start + size), cut at each epoch's end.
        rows = np.concatenate([
            orders[e][max(start - e * n, 0):min(start + size - e * n, n)]
            for e in range(first, last + 1)])
        rng = np.random.default_rng([self.seed, _STEP_STREAM, step])
        offsets, flips = self.augment.draw(rng, size)
        return rows, offsets, flips
