"""Batch augmentation: random crop with padding and horizontal flip, from given draws."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Augment:
    """crop_padding: pixels of edge padding before a random crop back to size (0 = off);
    flip: mirror half of the images horizontally."""

    crop_padding: int = 0
    flip: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Augment | None) -> Augment:
        if config is None:
            return cls()
        if isinstance(config, Augment):
            return config
        augment = cls(crop_padding=int(config.get("crop_padding", 0) or 0),
                      flip=bool(config.get("flip", False)))
        if augment.crop_padding < 0:
            raise ValueError(f"data.augment.crop_padding must be >= 0, got "
                             f"{augment.crop_padding}")
        return augment

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Random crop offsets int [n,2] in [0, 2·padding] and flips bool [n]."""
        offsets = rng.integers(0, 2 * self.crop_padding + 1, (n, 2))
        flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
        return offsets, flips

    def apply(self, images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """images uint8 [n,H,W,3] → uint8 [n,H,W,3]: edge-pad, crop at offsets, flip."""
        p = self.crop_padding
        if p:
            n, h, w, _ = images.shape
            padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
            windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
            # windows: [n, 2p+1, 2p+1, 3, h, w]; pick each image's offset.
            images = windows[np.arange(n), offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1)
        if flips.any():
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        return np.ascontiguousarray(images)
