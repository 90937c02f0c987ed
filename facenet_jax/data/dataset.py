"""The Dataset type every source returns: uint8 images, int32 identity labels, identity names;
and the registry of sources (`config.data.source` → a builder from `config.data`)."""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from facenet_jax.registry import Registry


class RowSubset:
    """Lazy rows of a (memory-mapped) image array: subsets of a cache larger than RAM.

    Behaves like a read-only uint8 array [N,H,W,3] for `len`, `shape`, slicing, integer and
    fancy indexing and `np.asarray`; reads from the base array only the rows asked for.
    """

    def __init__(self, base: Any, rows: np.ndarray):
        self.base, self.rows = base, np.asarray(rows, np.int64)
        self.dtype = base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return np.asarray(self.base[int(rows)])
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(rows), *self.base.shape[1:]), self.dtype)
        out[order] = self.base[rows[order]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


class DecodedOnAccess(abc.ABC):
    """Images decoded when read (packs, streamed folders): a read-only uint8 [N,S,S,3] array
    for `len`, `shape`, integer, slice and fancy indexing and `np.asarray`.

    An image that fails to decode is replaced by the next readable image of its identity (the
    rows after it, wrapping around; identities are contiguous runs of rows): the same
    replacement every time, counted in `replaced` and logged. An identity none of whose
    images decodes is a BadImageError. Subclasses pickle by their file paths (worker
    processes open their own handles).
    """

    def __init__(self, labels: np.ndarray, identity_names: Sequence[str], image_size: int):
        self.labels = np.asarray(labels, np.int32)
        if np.any(np.diff(self.labels) < 0):
            raise ValueError("DecodedOnAccess: an identity's rows must be contiguous (labels "
                             "non-decreasing)")
        self.identity_names = list(identity_names)
        # Identity i's rows: [bounds[i], bounds[i+1]) (C+1 numbers, not 2 per image: a copy
        # of this object goes to each input worker).
        self._bounds = np.searchsorted(self.labels, np.arange(len(self.identity_names) + 1))
        self.image_size = image_size
        self.dtype = np.dtype(np.uint8)
        self.replaced = 0

    @abc.abstractmethod
    def decode(self, row: int) -> np.ndarray:
        """uint8 [S,S,3] of `row`; BadImageError when it cannot be decoded."""

    @abc.abstractmethod
    def describe(self, row: int) -> str:
        """Where `row` comes from, for log lines (a file, a pack's record)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.labels), self.image_size, self.image_size, 3)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.decode_row(range(len(self))[index])
        if isinstance(index, slice):
            rows = np.arange(*index.indices(len(self)))
        else:
            rows = np.asarray(index)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
            if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
                raise IndexError(f"rows outside [0, {len(self)})")
            rows = rows % max(len(self), 1)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for i, row in enumerate(rows.tolist()):
            out[i] = self.decode_row(row)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def decode_row(self, row: int) -> np.ndarray:
        """uint8 [S,S,3] of `row`, or of its replacement when it does not decode."""
        label = int(self.labels[row])
        first, end = int(self._bounds[label]), int(self._bounds[label + 1])
        for step in range(end - first):
            candidate = first + (row - first + step) % (end - first)
            try:
                image = self.decode(candidate)
            except BadImageError as error:
                logging.warning("%s", error)
                continue
            if step:
                self.replaced += 1
                logging.warning("%s of identity %s replaced by %s (its identity's next "
                                "readable image)", self.describe(row),
                                self.identity_names[self.labels[row]], self.describe(candidate))
            return image
        raise BadImageError(f"no image of identity {self.identity_names[self.labels[row]]} "
                            f"decodes ({self.describe(first)} to {self.describe(end - 1)}): "
                            "the data is damaged; re-download or rebuild it")


@dataclasses.dataclass
class Dataset:
    """images uint8 [N,H,W,3] (array, memmap, RowSubset or a lazily decoded pack), labels int32 [N] in
    0..num_identities-1, identity_names [num_identities], paths [N] (None for generated data)."""

    images: Any
    labels: np.ndarray
    identity_names: list[str]
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, np.int32)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.labels) and (self.labels.min() < 0
                                 or self.labels.max() >= len(self.identity_names)):
            raise ValueError(f"labels must lie in [0, {len(self.identity_names)}) "
                             "(one name per identity)")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths for {len(self.labels)} images")

    @property
    def num_identities(self) -> int:
        return len(self.identity_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def counts(self) -> np.ndarray:
        """Images per identity, int [num_identities]."""
        return np.bincount(self.labels, minlength=self.num_identities)

    def subset(self, identity_ids: Sequence[int]) -> Dataset:
        """The images of the given identities, in dataset order; labels re-indexed 0..len-1
        in the order of `identity_ids`. Memory-mapped images stay on disk (a RowSubset)."""
        identity_ids = np.asarray(identity_ids, np.int64)
        if len(np.unique(identity_ids)) != len(identity_ids):
            raise ValueError("subset: identity ids must be distinct")
        if len(identity_ids) and (identity_ids.min() < 0
                                  or identity_ids.max() >= self.num_identities):
            raise ValueError(f"subset: identity ids must lie in [0, {self.num_identities})")
        new_label = np.full(self.num_identities, -1, np.int64)
        new_label[identity_ids] = np.arange(len(identity_ids))
        rows = np.flatnonzero(new_label[self.labels] >= 0)
        return Dataset(images=_take_rows(self.images, rows),
                       labels=new_label[self.labels[rows]],
                       identity_names=[self.identity_names[i] for i in identity_ids],
                       paths=None if self.paths is None else [self.paths[i] for i in rows])

    def with_min_images(self, min_images: int) -> tuple[Dataset, int]:
        """Drops identities with fewer than `min_images` images; returns (dataset, dropped)."""
        keep = np.flatnonzero(self.counts() >= min_images)
        dropped = self.num_identities - len(keep)
        return (self if dropped == 0 else self.subset(keep)), dropped


def _take_rows(images: Any, rows: np.ndarray) -> Any:
    if len(images) == len(rows):  # every row, in order: keep the array (or memmap) itself
        return images
    if isinstance(images, RowSubset):
        return RowSubset(images.base, images.rows[rows])
    if isinstance(images, np.memmap) or not isinstance(images, np.ndarray):
        return RowSubset(images, rows)  # on disk (a memmap, a lazily decoded pack) stays there
    return images[rows]


# `config.data.source` → builder(config.data) -> Dataset, registered where each source is
# defined (synthetic.py, folder.py, tfds_source.py, rec.py).
DATA_SOURCES: Registry[Callable[[Any], Dataset]] = Registry("data source",
                                                            valid="valid sources")
