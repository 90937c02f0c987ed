"""Synthetic faces: determinism, shapes, the difficulty knob, and the pixel-baseline bound."""

import numpy as np
import pytest

from facenet_jax import data


def _pixel_kfold_accuracy(dataset: data.Dataset, pairs: data.Pairs) -> float:
    """Independent reference of the LFW protocol on raw pixels: [0,1], flattened, unit norm;
    per fold the threshold (over every distance on the other folds) that maximises accuracy."""
    x = dataset.images.reshape(len(dataset.images), -1).astype(np.float64) / 255
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.sum((x[pairs.first] - x[pairs.second]) ** 2, axis=1)
    accuracies = []
    for fold in np.unique(pairs.fold):
        train = pairs.fold != fold
        thresholds = np.unique(dist[train])
        train_acc = [np.mean((dist[train] <= t) == pairs.is_same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[~train] <= best) == pairs.is_same[~train]))
    return float(np.mean(accuracies))


def test_shapes_labels_and_determinism():
    a = data.load_synthetic(6, 5, image_size=24, difficulty=1.0, seed=3)
    b = data.load_synthetic(6, 5, image_size=24, difficulty=1.0, seed=3)
    c = data.load_synthetic(6, 5, image_size=24, difficulty=1.0, seed=4)
    assert a.images.shape == (30, 24, 24, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.labels, np.repeat(np.arange(6), 5))
    assert a.num_identities == 6 and len(set(a.identity_names)) == 6 and a.paths is None
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_image_depends_only_on_seed_identity_and_index():
    small = data.load_synthetic(3, 2, image_size=16, seed=0)
    large = data.load_synthetic(5, 4, image_size=16, seed=0)
    # identity i, image j is the same however many identities / images are generated
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(small.images[i * 2 + j], large.images[i * 4 + j])


def test_difficulty_zero_gives_identical_images_per_identity():
    ds = data.load_synthetic(4, 3, image_size=16, difficulty=0.0, seed=0)
    per_identity = ds.images.reshape(4, 3, -1)
    assert np.all(per_identity == per_identity[:, :1])
    assert len({im.tobytes() for im in per_identity[:, 0]}) == 4  # identities differ


def test_difficulty_is_a_monotone_knob_on_within_identity_spread():
    spreads = []
    for difficulty in (0.25, 0.5, 1.0, 1.5):
        ds = data.load_synthetic(10, 6, image_size=16, difficulty=difficulty, seed=1)
        x = ds.images.reshape(10, 6, -1).astype(np.float64)
        spreads.append(np.mean(np.std(x, axis=1)))
    assert np.all(np.diff(spreads) > 0), spreads


def test_default_is_hard_on_raw_pixels_but_identity_survives():
    # Held-out identities of the default config: 10-fold LFW protocol on raw pixels.
    default = data.load_synthetic(60, 20, image_size=32, difficulty=1.0, seed=11)
    pairs = data.generate_pairs(default, num_folds=10, pairs_per_fold=150, seed=0)
    assert _pixel_kfold_accuracy(default, pairs) <= 0.75
    # At low difficulty the same pixel baseline separates identities: the signal is there.
    easy = data.load_synthetic(60, 20, image_size=32, difficulty=0.1, seed=11)
    assert _pixel_kfold_accuracy(easy, pairs) >= 0.95


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_identities=0, images_per_identity=2), "num_identities"),
    (dict(num_identities=2, images_per_identity=2, image_size=4), "image_size"),
    (dict(num_identities=2, images_per_identity=2, difficulty=-1.0), "difficulty"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_synthetic(**kwargs)


def test_load_dataset_dispatches_on_the_config(tmp_path):
    from facenet_jax.config import load_config

    config = load_config("experiments/default.py", {
        "data.synthetic.num_identities": 12, "data.synthetic.images_per_identity": 3,
        "data.image_size": 16})
    ds = data.load_dataset(config.data)
    np.testing.assert_array_equal(ds.images, data.load_synthetic(12, 3, 16, 1.0, seed=0).images)
    splits = data.split_dataset(ds, config.data)
    assert [s.num_identities for s in splits.values()] == [10, 1, 1]
    config.data.source = "folder"
    with pytest.raises(ValueError, match="needs data.root"):
        data.load_dataset(config.data)
    config.data.source = "tfds"
    with pytest.raises(ValueError, match="needs data.name"):
        data.load_dataset(config.data)
    config.data.source = "webdataset"
    with pytest.raises(ValueError, match="unknown data.source 'webdataset'"):
        data.load_dataset(config.data)
