"""Host-side data: sources (synthetic faces, image folders, tfds) → identity-disjoint splits →
verification pairs and the P×K sampler → background prefetch."""

from __future__ import annotations

from typing import Any

# The sources register in the order they are listed: synthetic, folder, tfds.
from facenet_jax.data.synthetic import load_synthetic  # noqa: I001
from facenet_jax.data.augment import Augment
from facenet_jax.data.dataset import DATA_SOURCES, Dataset, RowSubset
from facenet_jax.data.folder import (IMAGE_EXTENSIONS, BadImageError, decode_image,
                                     load_folder_as_configured, load_image_folder, load_images)
from facenet_jax.data.pairs import Pairs, generate_pairs, read_pairs, write_pairs
from facenet_jax.data.prefetch import prefetch
from facenet_jax.data.sampler import PKSampler
from facenet_jax.data.splits import (check_split_record, split_dataset, split_identities,
                                     write_split_record)
from facenet_jax.data.tfds_source import load_tfds

SOURCES = DATA_SOURCES.names()  # as registered at import (the registry is the source of truth)

__all__ = ["Augment", "BadImageError", "DATA_SOURCES", "Dataset", "IMAGE_EXTENSIONS",
           "PKSampler", "Pairs", "RowSubset", "SOURCES", "check_split_record", "decode_image",
           "generate_pairs", "load_dataset", "load_folder_as_configured", "load_image_folder", "load_images",
           "load_synthetic", "load_tfds", "prefetch", "read_pairs", "split_dataset",
           "split_identities", "write_pairs", "write_split_record"]


def load_dataset(data_config: Any) -> Dataset:
    """The dataset `config.data` describes (source: a DATA_SOURCES name)."""
    return DATA_SOURCES.get(data_config.source, key="data.source")(data_config)
