"""Host-side data: sources (synthetic faces, image folders, tfds, RecordIO packs) →
identity-disjoint splits → verification pairs and a batch sampler (P×K or uniform:
`make_sampler`) → background prefetch, or worker processes (`stream_host_batches`)."""

from __future__ import annotations

from typing import Any

# The sources register in the order they are listed: synthetic, folder, tfds, rec.
from facenet_jax.data.synthetic import load_synthetic  # noqa: I001
from facenet_jax.data.augment import Augment
from facenet_jax.data.dataset import DATA_SOURCES, Dataset, DecodedOnAccess, RowSubset
from facenet_jax.data.folder import (IMAGE_EXTENSIONS, BadImageError, FolderImages,
                                     decode_image, load_folder_as_configured, load_image_folder,
                                     load_images)
from facenet_jax.data.pairs import (Pairs, generate_pairs, read_pairs,
                                   restrict_to_pair_identities, write_pairs)
from facenet_jax.data.prefetch import prefetch
from facenet_jax.data.sampler import PKSampler, RowSampler, validate_batch_layout
from facenet_jax.data.splits import (EXCLUDE_FOLD_KEY, check_split_record, split_dataset,
                                     split_identities, validate_exclude_fold,
                                     write_split_record)
from facenet_jax.data.tfds_source import load_tfds
from facenet_jax.data.rec import PackImages, load_pack
from facenet_jax.data.stream import (PIPELINES, InputWorkerError, pipeline_of,
                                     stream_host_batches, worker_count)
from facenet_jax.data.uniform_sampler import UniformSampler, validate_uniform_batch
from facenet_jax.checks import check_positive_int
from facenet_jax.config import get_dotted
from facenet_jax.registry import Registry

SOURCES = DATA_SOURCES.names()  # as registered at import (the registry is the source of truth)
# config.data.sampler → the sampler it builds from (training split, config, device count).
SAMPLERS_REGISTRY: Registry = Registry("data.sampler", valid="valid samplers")
SAMPLERS_REGISTRY.add("pk", lambda dataset, config, common: PKSampler(
    dataset, identities=config.batch.identities,
    images_per_identity=config.batch.images_per_identity, **common))
# P×K is only the batch size here, so configs stay comparable across samplers.
SAMPLERS_REGISTRY.add("uniform", lambda dataset, config, common: UniformSampler(
    dataset, batch_size=config.batch.identities * config.batch.images_per_identity, **common))
SAMPLERS = SAMPLERS_REGISTRY.names()
# Counts under config.data that are meaningless below 1.
POSITIVE_INT_KEYS = ("prefetch", "pairs.num_folds", "pairs.pairs_per_fold")

__all__ = ["Augment", "BadImageError", "DATA_SOURCES", "Dataset", "DecodedOnAccess",
           "EXCLUDE_FOLD_KEY", "IMAGE_EXTENSIONS",
           "FolderImages", "InputWorkerError", "PIPELINES", "pipeline_of", "stream_host_batches", "worker_count",
           "PKSampler", "Pairs", "RowSampler", "RowSubset", "SAMPLERS", "SAMPLERS_REGISTRY",
           "SOURCES", "UniformSampler", "check_split_record", "decode_image", "generate_pairs",
           "load_dataset", "load_folder_as_configured", "load_image_folder", "load_images",
           "load_pack", "load_synthetic", "load_tfds", "PackImages", "make_sampler", "prefetch", "read_pairs",
           "restrict_to_pair_identities",
           "split_dataset", "split_identities", "validate_batch_layout",
           "validate_data_config", "validate_exclude_fold", "validate_sampler",
           "validate_uniform_batch", "write_pairs", "write_split_record"]


def load_dataset(data_config: Any) -> Dataset:
    """The dataset `config.data` describes (source: a DATA_SOURCES name)."""
    return DATA_SOURCES.get(data_config.source, key="data.source")(data_config)


def make_sampler(dataset: Dataset, config: Any, num_shards: int) -> RowSampler:
    """The training batches `config.data.sampler` names ("pk": PKSampler, "uniform":
    UniformSampler), with config.batch's size, `seed` and `data.augment`, over num_shards
    devices."""
    build = SAMPLERS_REGISTRY.get(config.data.sampler, key="data.sampler")
    common = dict(seed=config.seed, num_shards=num_shards, augment=config.data.augment)
    return build(dataset, config, common)


def validate_sampler(kind: str) -> None:
    """ValueError unless `kind` (config.data.sampler) is a registered sampler."""
    SAMPLERS_REGISTRY.get(kind, key="data.sampler")


def validate_data_config(data_config: Any) -> None:
    """ValueError (one line: the key and the fix) for a bad `config.data` that needs no data
    read: an unknown sampler or source (their registries), a count below 1, a bad
    data.split.exclude_pairs_fold. The batch's fit to the devices is the trainer's check
    (train.validate), the source's own keys are checked when it loads."""
    validate_sampler(data_config.sampler)
    DATA_SOURCES.get(data_config.source, key="data.source")
    for key in POSITIVE_INT_KEYS:
        check_positive_int(get_dotted(data_config, key), f"data.{key}")
    validate_exclude_fold(data_config.split)
