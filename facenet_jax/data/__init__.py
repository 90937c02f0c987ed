"""Host-side data: sources (synthetic faces, image folders, tfds) → identity-disjoint splits →
verification pairs and a batch sampler (P×K or uniform: `make_sampler`) → background
prefetch."""

from __future__ import annotations

import pathlib
from typing import Any

from facenet_jax.data.augment import Augment
from facenet_jax.data.dataset import Dataset, RowSubset
from facenet_jax.data.folder import (IMAGE_EXTENSIONS, BadImageError, decode_image,
                                     load_image_folder, load_images)
from facenet_jax.data.pairs import Pairs, generate_pairs, read_pairs, write_pairs
from facenet_jax.data.prefetch import prefetch
from facenet_jax.data.sampler import PKSampler, RowSampler
from facenet_jax.data.splits import (check_split_record, split_dataset, split_identities,
                                     write_split_record)
from facenet_jax.data.synthetic import load_synthetic
from facenet_jax.data.tfds_source import load_tfds
from facenet_jax.data.uniform_sampler import UniformSampler

SOURCES = ("synthetic", "folder", "tfds")
# config.data.sampler → the sampler it builds from (training split, config, device count).
_SAMPLER_BUILDERS = {
    "pk": lambda dataset, config, common: PKSampler(
        dataset, identities=config.batch.identities,
        images_per_identity=config.batch.images_per_identity, **common),
    # P×K is only the batch size here, so configs stay comparable across samplers.
    "uniform": lambda dataset, config, common: UniformSampler(
        dataset, batch_size=config.batch.identities * config.batch.images_per_identity,
        **common),
}
SAMPLERS = tuple(_SAMPLER_BUILDERS)

__all__ = ["Augment", "BadImageError", "Dataset", "IMAGE_EXTENSIONS", "PKSampler", "Pairs",
           "RowSampler", "RowSubset", "SAMPLERS", "SOURCES", "UniformSampler",
           "check_split_record", "decode_image", "generate_pairs", "load_dataset",
           "load_folder_as_configured", "load_image_folder", "load_images", "load_synthetic",
           "load_tfds", "make_sampler", "prefetch", "read_pairs", "split_dataset",
           "split_identities", "validate_sampler", "write_pairs", "write_split_record"]


def load_folder_as_configured(root: str | pathlib.Path, data_config: Any, *,
                              min_images_per_identity: int) -> Dataset:
    """An image folder preprocessed as `config.data` says (size, crop, cache folder, bad
    files): a run's training folder, or a folder its trained encoder evaluates or embeds."""
    return load_image_folder(
        pathlib.Path(root), data_config.image_size, center_crop=data_config.center_crop,
        cache_dir=data_config.cache_dir, skip_bad_files=data_config.skip_bad_files,
        min_images_per_identity=min_images_per_identity)


def load_dataset(data_config: Any) -> Dataset:
    """The dataset `config.data` describes (source: synthetic | folder | tfds)."""
    source = data_config.source
    if source == "synthetic":
        synthetic = data_config.synthetic
        return load_synthetic(synthetic.num_identities, synthetic.images_per_identity,
                              data_config.image_size, synthetic.difficulty,
                              seed=synthetic.get("seed", 0))
    min_images = data_config.get("min_images_per_identity", 2)
    if source == "folder":
        if not data_config.root:
            raise ValueError("data.source='folder' needs data.root: a folder laid out as "
                             "root/<identity>/<image>; pass --config.data.root=PATH")
        return load_folder_as_configured(data_config.root, data_config,
                                         min_images_per_identity=min_images)
    if source == "tfds":
        if not data_config.name:
            raise ValueError("data.source='tfds' needs data.name (a registered tfds dataset, "
                             "e.g. 'lfw'); pass --config.data.name=NAME")
        dataset = load_tfds(data_config.name, split=data_config.tfds_split,
                            image_size=data_config.image_size,
                            data_dir=data_config.tfds_data_dir,
                            center_crop=data_config.center_crop)
        return dataset.with_min_images(min_images)[0]
    raise ValueError(f"unknown data.source {source!r}; valid sources: {', '.join(SOURCES)}")


def make_sampler(dataset: Dataset, config: Any, num_shards: int) -> RowSampler:
    """The training batches `config.data.sampler` names ("pk": PKSampler, "uniform":
    UniformSampler), with config.batch's size, `seed` and `data.augment`, over num_shards
    devices."""
    kind = config.data.sampler
    validate_sampler(kind)
    common = dict(seed=config.seed, num_shards=num_shards, augment=config.data.augment)
    return _SAMPLER_BUILDERS[kind](dataset, config, common)


def validate_sampler(kind: str) -> None:
    """ValueError unless `kind` (config.data.sampler) is one of SAMPLERS."""
    if kind not in _SAMPLER_BUILDERS:
        raise ValueError(f"unknown data.sampler {kind!r}; valid samplers: {', '.join(SAMPLERS)} "
                         "(pass e.g. --config.data.sampler=pk)")
