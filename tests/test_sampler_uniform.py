"""config.data.sampler: the uniform sampler (every image once per epoch) and the factory."""

import numpy as np
import pytest

from facenet_jax import config as cfg
from facenet_jax import data
from facenet_jax.train.validate import validate_run_config

DEFAULT = "experiments/default.py"


def _tagged(num_images: int, num_identities: int = 7) -> data.Dataset:
    """Images tagged with their row (pixel [0,0,0]) and label (pixel [0,0,1])."""
    labels = np.arange(num_images) % num_identities
    images = np.zeros((num_images, 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(num_images)
    images[:, 0, 0, 1] = labels
    return data.Dataset(images=images, labels=labels,
                        identity_names=[f"id{i}" for i in range(num_identities)])


def _rows(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("num_images, batch_size", [
    (53, 8),   # step 6 holds positions 48..55: the end of epoch 0 and the start of epoch 1
    (5, 12),   # a dataset smaller than a batch: each batch wraps through several epochs
])
def test_every_image_appears_exactly_once_per_epoch(num_images, batch_size):
    dataset = _tagged(num_images)
    sampler = data.UniformSampler(dataset, batch_size=batch_size, seed=3)
    epochs = 4
    steps = -(-epochs * num_images // batch_size)  # ceil: cover 4 whole epochs
    batches = [sampler.batch(step) for step in range(steps)]
    stream = np.concatenate([_rows(images) for images, _ in batches])
    assert all(len(images) == batch_size for images, _ in batches)
    orders = stream[:epochs * num_images].reshape(epochs, num_images)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(num_images))
    assert len({tuple(order) for order in orders}) > 1  # a new order per epoch (5! is small)
    labels = np.concatenate([labels for _, labels in batches])
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, dataset.labels[stream])


def test_batches_are_a_pure_function_of_seed_and_step():
    dataset = _tagged(40)
    augment = dict(crop_padding=2, flip=True)
    a = data.UniformSampler(dataset, batch_size=16, seed=5, augment=augment)
    b = data.UniformSampler(dataset, batch_size=16, seed=5, augment=augment)
    late, early = b.batch(7), b.batch(3)  # any order: resuming at step s gives step s
    for got, want in ((early, a.batch(3)), (late, a.batch(7))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    other = data.UniformSampler(dataset, batch_size=16, seed=6, augment=augment)
    assert not np.array_equal(a.plan(3)[0], other.plan(3)[0])
    assert not np.array_equal(a.plan(0)[0], a.plan(2)[0][:16])  # epochs 0 and 1 differ


def test_augmentation_is_the_plans_draws_applied_to_the_plans_rows():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    dataset = data.Dataset(images=images, labels=np.arange(30) % 3,
                           identity_names=["a", "b", "c"])
    augment = data.Augment(crop_padding=2, flip=True)
    sampler = data.UniformSampler(dataset, batch_size=12, seed=1, augment=augment)
    rows, offsets, flips = sampler.plan(2)  # positions 24..35: spans two epochs
    assert offsets.shape == (12, 2) and flips.shape == (12,) and flips.any()
    got_images, got_labels = sampler.batch(2)
    np.testing.assert_array_equal(got_images, augment.apply(images[rows], offsets, flips))
    np.testing.assert_array_equal(got_labels, dataset.labels[rows])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_rows_concatenate_to_the_single_process_batch(processes):
    dataset = _tagged(29)
    augment = dict(crop_padding=2, flip=True)
    reference = data.UniformSampler(dataset, batch_size=16, seed=2, augment=augment)
    sampler = data.UniformSampler(dataset, batch_size=16, seed=2, num_shards=4,
                                  augment=augment)
    for step in (0, 1, 5):  # step 1 spans the end of epoch 0
        want = reference.batch(step)
        parts = [sampler.host_batch(step, p, processes) for p in range(processes)]
        assert all(len(part[0]) == 16 // processes for part in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), want[0])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), want[1])


def test_an_epochs_order_is_computed_once_while_the_steps_stay_in_it():
    # Millions of images: only the images array's length matters to the plan.
    pixels = np.broadcast_to(np.zeros((1, 2, 2, 3), np.uint8), (2_000_000, 2, 2, 3))
    dataset = data.Dataset(images=pixels, labels=np.zeros(2_000_000, np.int32),
                           identity_names=["x"])
    sampler = data.UniformSampler(dataset, batch_size=1024, seed=0)
    sampler.plan(0)
    order = sampler.epoch_order(0)
    for step in (1, 2, 1000):
        sampler.plan(step)
        assert sampler.epoch_order(0) is order  # kept, not recomputed
    np.testing.assert_array_equal(sampler.plan(1)[0], order[1024:2048])


def test_make_sampler_follows_config_data_sampler():
    dataset = _tagged(60, num_identities=10)
    config = cfg.load_config(DEFAULT, {"batch.identities": 4, "batch.images_per_identity": 3})
    assert config.data.sampler == "pk"
    pk = data.make_sampler(dataset, config, num_shards=2)
    assert type(pk) is data.PKSampler and (pk.identities, pk.images_per_identity) == (4, 3)
    labels = pk.batch(0)[1].reshape(4, 3)
    assert np.all(labels == labels[:, :1])  # P whole identities of K images
    config.data.sampler = "uniform"
    uniform = data.make_sampler(dataset, config, num_shards=2)
    assert type(uniform) is data.UniformSampler and uniform.batch_size == 12
    assert uniform.num_shards == 2 and uniform.seed == config.seed
    assert uniform.augment == data.Augment.from_config(config.data.augment)
    config.data.sampler = "random"
    with pytest.raises(ValueError, match="unknown data.sampler 'random'; valid samplers: pk, "
                                         "uniform"):
        data.make_sampler(dataset, config, num_shards=2)


def test_the_sampler_defaults_to_pk_and_another_one_is_another_run():
    current = cfg.to_plain(cfg.load_config(DEFAULT))
    assert current["data"]["sampler"] == "pk"
    uniform = cfg.to_plain(cfg.load_config(DEFAULT, {"data.sampler": "uniform"}))
    assert cfg.changed_keys(current, uniform) == ["data.sampler"]


@pytest.mark.parametrize("overrides, devices, message", [
    ({"data.sampler": "random"}, 1, r"unknown data.sampler 'random'; valid samplers: pk, uniform"),
    ({"data.sampler": "uniform", "batch.identities": 10, "batch.images_per_identity": 3}, 8,
     r"batch size .* = 30 is not divisible by the 8 devices; make the product 24 or 32"),
    ({"data.sampler": "uniform", "batch.identities": 0}, 1,
     r"config.batch.identities must be a positive integer, got 0"),
    ({"data.sampler": "uniform", "batch.images_per_identity": -2}, 1,
     r"config.batch.images_per_identity must be a positive integer, got -2"),
    # the P×K rules stay for "pk"
    ({"batch.images_per_identity": 1}, 1, r"images_per_identity \(K\) = 1"),
    ({"batch.identities": 12}, 8, r"identities \(P\) = 12 is not divisible by the 8"),
])
def test_bad_sampler_settings_are_clear_errors(overrides, devices, message):
    config = cfg.load_config(DEFAULT, overrides)
    with pytest.raises(ValueError, match=message):
        validate_run_config(config, num_devices=devices)


def test_uniform_lifts_the_pk_rules_it_does_not_need():
    # K = 1, and P not a multiple of the devices: only the product must be
    config = cfg.load_config(DEFAULT, {"data.sampler": "uniform", "batch.identities": 1,
                                       "batch.images_per_identity": 8})
    validate_run_config(config, num_devices=8)
    config.batch.identities, config.batch.images_per_identity = 12, 2
    validate_run_config(config, num_devices=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"batch size .* = 0 must be >= 1"),
    (dict(batch_size=6, num_shards=4), "not divisible by the 4 devices"),
    (dict(batch_size=4, augment=dict(crop_padding=4)), "too large"),
])
def test_invalid_uniform_samplers_are_clear_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.UniformSampler(_tagged(10), seed=0, **kwargs)
    with pytest.raises(ValueError, match="empty training split"):
        data.UniformSampler(_tagged(0), batch_size=4, seed=0)
