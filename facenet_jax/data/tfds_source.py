"""tfds datasets with an image and a label feature (e.g. `lfw`). TensorFlow is optional and
imported only here: `pip install '.[tfds]'`."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from facenet_jax.data.dataset import DATA_SOURCES, Dataset
from facenet_jax.data.folder import _check_preprocessing, resize_array

_INSTALL = "pip install '.[tfds]'  (tensorflow-datasets, tensorflow-cpu, importlib_resources)"


@DATA_SOURCES.register("tfds")
def tfds_as_configured(data_config: Any) -> Dataset:
    """The prepared tfds dataset `config.data.name` (split `data.tfds_split`)."""
    if not data_config.name:
        raise ValueError("data.source='tfds' needs data.name (a registered tfds dataset, "
                         "e.g. 'lfw'); pass --config.data.name=NAME")
    dataset = load_tfds(data_config.name, split=data_config.tfds_split,
                        image_size=data_config.image_size, data_dir=data_config.tfds_data_dir,
                        center_crop=data_config.center_crop)
    return dataset.with_min_images(data_config.get("min_images_per_identity", 2))[0]


def load_tfds(name: str, *, split: str = "train", image_size: int, data_dir: str | None = None,
              image_key: str | None = None, label_key: str | None = None,
              center_crop: float | None = None) -> Dataset:
    """A prepared tfds dataset → Dataset (images resized like image folders; identity names
    from a ClassLabel's names or a Text label's values). Never downloads: an unprepared
    dataset is an error saying how to prepare it."""
    _check_preprocessing(image_size, center_crop)
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"unknown tfds dataset {name!r}: {error}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Prepare it on a "
            f"machine with network access: `tfds build {name}"
            f"{' --data_dir ' + data_dir if data_dir else ''}` (or "
            f"tfds.builder({name!r}).download_and_prepare()), then copy the data dir here")
    features = builder.info.features
    image_key = image_key or _find_feature(features, tfds.features.Image, "image", name)
    label_key = label_key or _find_feature(features, (tfds.features.ClassLabel,
                                                      tfds.features.Text), "label", name)
    label_feature = features[label_key]
    images, raw_labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        images.append(resize_array(example[image_key], image_size, center_crop))
        raw_labels.append(example[label_key])
    if not images:
        raise ValueError(f"tfds {name!r} split {split!r} is empty")
    if isinstance(label_feature, tfds.features.ClassLabel):
        keys = [label_feature.int2str(int(l)) for l in raw_labels]
    else:
        keys = [l.decode() if isinstance(l, bytes) else str(l) for l in raw_labels]
    names = sorted(set(keys))
    index = {n: i for i, n in enumerate(names)}
    logging.info("tfds %s[%s]: %d images of %d identities", name, split, len(images), len(names))
    return Dataset(images=np.stack(images), labels=np.array([index[k] for k in keys]),
                   identity_names=names, paths=None)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
        import tensorflow  # noqa: F401  (tfds reads prepared data through TensorFlow)
    except ImportError as error:
        raise ImportError(f"data.source='tfds' needs TensorFlow and tensorflow-datasets "
                          f"({error}); install the optional extra: {_INSTALL}") from error
    return tfds


def _find_feature(features: Any, kind: Any, role: str, name: str) -> str:
    matches = [k for k, f in features.items() if isinstance(f, kind)]
    if len(matches) != 1:
        raise ValueError(f"tfds {name!r}: cannot tell the {role} feature among "
                         f"{list(features.keys())} ({len(matches)} candidates); pass "
                         f"{role}_key=...")
    return matches[0]
