"""The P×K sampler, augmentation and prefetch."""

import threading
import time

import numpy as np
import pytest

from facenet_jax import data


@pytest.fixture(scope="module")
def dataset():
    # identity 0..9 with 5 images, identity 10 with 2 (fewer than K), identity 11 with 1
    labels = np.concatenate([np.repeat(np.arange(10), 5), [10, 10, 11]])
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))  # each image tagged with its row
    images[:, 0, 0, 1] = labels
    return data.Dataset(images=images, labels=labels,
                        identity_names=[f"id{i}" for i in range(12)])


def _rows(images):
    return images[:, 0, 0, 0].astype(int)


def test_batch_is_p_whole_identities_of_k_images(dataset):
    sampler = data.PKSampler(dataset, identities=4, images_per_identity=3, seed=0)
    for step in range(30):
        images, labels = sampler.batch(step)
        assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        blocks = labels.reshape(4, 3)
        assert np.all(blocks == blocks[:, :1]) and len(set(blocks[:, 0])) == 4
        assert 11 not in labels  # one image: never trainable
        np.testing.assert_array_equal(dataset.labels[_rows(images)], labels)
        for block in _rows(images).reshape(4, 3):
            if dataset.labels[block[0]] != 10:  # enough images: no repeats
                assert len(set(block)) == 3


def test_identity_with_fewer_than_k_images_is_sampled_with_replacement(dataset):
    sampler = data.PKSampler(dataset, identities=10, images_per_identity=4, seed=1)
    seen = False
    for step in range(20):
        images, labels = sampler.batch(step)
        rows = _rows(images)[labels == 10]
        if len(rows):
            seen = True
            assert len(rows) == 4 and set(rows) <= {50, 51}
    assert seen


def test_batches_are_a_pure_function_of_seed_and_step(dataset):
    augment = dict(crop_padding=2, flip=True)
    a = data.PKSampler(dataset, identities=4, images_per_identity=2, seed=5, augment=augment)
    b = data.PKSampler(dataset, identities=4, images_per_identity=2, seed=5, augment=augment)
    resumed = [b.batch(s) for s in (7, 3)]  # any order: resuming at step s gives step s
    np.testing.assert_array_equal(a.batch(3)[0], resumed[1][0])
    np.testing.assert_array_equal(a.batch(7)[1], resumed[0][1])
    other = data.PKSampler(dataset, identities=4, images_per_identity=2, seed=6)
    assert not np.array_equal(a.batch(3)[1], other.batch(3)[1])


def test_global_batch_is_the_same_for_every_shard_and_process_count(dataset):
    augment = dict(crop_padding=2, flip=True)
    one = data.PKSampler(dataset, identities=8, images_per_identity=3, seed=2, augment=augment)
    reference = one.batch(4)
    for shards, processes in ((2, 1), (4, 2), (8, 4), (8, 8)):
        sampler = data.PKSampler(dataset, identities=8, images_per_identity=3, seed=2,
                                 num_shards=shards, augment=augment)
        parts = [sampler.host_batch(4, p, processes) for p in range(processes)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), reference[0])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), reference[1])
        # each shard's contiguous rows hold whole identities (P/n identities × K images)
        for shard in np.split(reference[1], shards):
            assert len(shard) % 3 == 0 and np.all(shard.reshape(-1, 3) == shard.reshape(-1, 3)[:, :1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(identities=1, images_per_identity=2), r"identities \(P\) = 1"),
    (dict(identities=4, images_per_identity=1), r"images_per_identity \(K\) = 1"),
    (dict(identities=6, images_per_identity=2, num_shards=4), "not divisible by the 4"),
    (dict(identities=12, images_per_identity=2), "exceeds the 11 trainable"),
    (dict(identities=4, images_per_identity=2, augment=dict(crop_padding=4)), "too large"),
    (dict(identities=4, images_per_identity=2, augment=dict(crop_padding=-1)), ">= 0"),
])
def test_invalid_layouts_are_clear_value_errors(dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.PKSampler(dataset, seed=0, **kwargs)


def test_augment_matches_a_per_image_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    augment = data.Augment(crop_padding=2, flip=True)
    offsets, flips = augment.draw(np.random.default_rng(1), 6)
    out = augment.apply(images, offsets, flips)
    for image, (dy, dx), flip, result in zip(images, offsets, flips, out):
        padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
        expected = padded[dy:dy + 5, dx:dx + 7]
        np.testing.assert_array_equal(result, expected[:, ::-1] if flip else expected)
    assert flips.any() and not flips.all() and len({tuple(o) for o in offsets}) > 1
    # off: identity
    none = data.Augment()
    np.testing.assert_array_equal(none.apply(images, *none.draw(np.random.default_rng(1), 6)),
                                  images)


def test_memory_mapped_rows_are_read_without_loading_everything(tmp_path, dataset):
    stored = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8,
                                       shape=dataset.images.shape)
    stored[:] = dataset.images
    stored.flush()
    mapped = data.Dataset(np.load(tmp_path / "x.npy", mmap_mode="r"), dataset.labels,
                          dataset.identity_names)
    sub = mapped.subset([3, 1])
    assert isinstance(sub.images, data.RowSubset)
    np.testing.assert_array_equal(np.asarray(sub.images), dataset.subset([3, 1]).images)
    a = data.PKSampler(sub, identities=2, images_per_identity=2, seed=0).batch(0)
    b = data.PKSampler(dataset.subset([3, 1]), identities=2, images_per_identity=2,
                       seed=0).batch(0)
    np.testing.assert_array_equal(a[0], b[0])


def test_prefetch_yields_in_order_runs_ahead_and_reraises():
    produced = []

    def slow():
        for i in range(6):
            produced.append(i)
            yield i

    iterator = data.prefetch(slow(), buffer_size=2)
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:  # runs ahead before being asked
        time.sleep(0.01)
    assert len(produced) >= 3
    assert list(iterator) == list(range(6))

    def failing():
        yield 1
        raise RuntimeError("decode failed")

    iterator = data.prefetch(failing(), buffer_size=1)
    assert next(iterator) == 1
    with pytest.raises(RuntimeError, match="decode failed"):
        next(iterator)
    with pytest.raises(ValueError, match="buffer_size"):
        data.prefetch([], 0)


def test_prefetch_thread_stops_when_the_consumer_closes():
    before = threading.active_count()
    iterator = data.prefetch(iter(range(10**9)), buffer_size=2)
    next(iterator)
    iterator.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before
