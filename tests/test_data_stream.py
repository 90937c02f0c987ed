"""The streaming input pipeline (data.pipeline="stream"): batches built in worker processes
are the batches of `host_batch`, step by step, for any worker count and from any start step
(resume); replacements made in workers are counted; a dying worker is reported clearly."""

import os

import ml_collections
import numpy as np
import pytest

from facenet_jax import data
from facenet_jax.data import rec


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    faces = data.load_synthetic(num_identities=12, images_per_identity=5, image_size=24, seed=2)
    payloads = [rec.encode_jpeg(image) for image in faces.images]
    payloads[7] = b"unreadable"  # identity 1's 3rd image
    root = tmp_path_factory.mktemp("stream") / "pack"
    rec.write_pack(root, payloads, faces.labels, image_size=24)
    return root


def _sampler(pack, cls=data.PKSampler):
    return cls(rec.load_pack(pack, image_size=24), identities=4, images_per_identity=3,
               seed=7, augment={"crop_padding": 2, "flip": True})


def _check_stream(pack, workers, steps):
    reference = _sampler(pack)
    expected = [reference.host_batch(s, 0, 1) for s in steps]
    sampler = _sampler(pack)
    got = list(data.stream_host_batches(sampler, steps, 0, 1, workers=workers, buffer_size=2))
    assert len(got) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
    assert reference.replaced_images > 0  # the unreadable image was drawn ...
    assert sampler.replaced_images == reference.replaced_images  # ... and counted once each


def test_a_thread_streams_the_samplers_batches_and_counts_replacements(pack):
    _check_stream(pack, workers=0, steps=range(3, 15))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_stream_the_same_batches_from_any_step(pack, workers):
    pytest.importorskip("grain")
    _check_stream(pack, workers=workers, steps=range(3, 15))  # a resume at step 3


class _DyingSampler(data.PKSampler):
    """A test hook: the worker building step 4 dies as an out-of-memory kill would."""

    def host_batch(self, step, process_index, process_count):
        if step == 4:
            os._exit(9)
        return super().host_batch(step, process_index, process_count)


@pytest.mark.slow
def test_a_dying_worker_is_reported_with_its_step_and_what_to_do(pack):
    pytest.importorskip("grain")
    batches = data.stream_host_batches(_sampler(pack, _DyingSampler), range(0, 10), 0, 1,
                                       workers=2, buffer_size=2)
    with pytest.raises(data.InputWorkerError, match="input worker process died.*data.workers"):
        list(batches)


def _data_config(**values):
    return ml_collections.ConfigDict({"source": "rec", "pipeline": None, "workers": None,
                                      **values})


def test_the_pipeline_follows_the_source_and_refuses_what_cannot_work():
    assert data.pipeline_of(_data_config()) == "stream"
    assert data.pipeline_of(_data_config(source="folder")) == "cache"
    assert data.pipeline_of(_data_config(source="synthetic", pipeline="cache")) == "cache"
    with pytest.raises(ValueError, match="always streams"):
        data.pipeline_of(_data_config(pipeline="cache"))
    assert data.pipeline_of(_data_config(source="folder", pipeline="stream")) == "stream"
    with pytest.raises(ValueError, match="decoded once"):
        data.pipeline_of(_data_config(source="synthetic", pipeline="stream"))
    with pytest.raises(ValueError, match="must be one of"):
        data.pipeline_of(_data_config(pipeline="fast"))


def test_worker_count_is_given_or_the_hosts_cores_less_one():
    assert data.worker_count(_data_config(workers=3)) == 3
    assert data.worker_count(_data_config(workers=0)) == 0
    with pytest.raises(ValueError, match="data.workers"):
        data.worker_count(_data_config(workers=-1))
    expected = (max(1, min(16, (os.cpu_count() or 2) - 1))
                if data.stream.grain_installed() else 0)
    assert data.worker_count(_data_config()) == expected


def test_workers_without_grain_fail_before_training_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(data.stream, "grain_installed", lambda: False)
    assert data.worker_count(_data_config()) == 0  # the default falls back to a thread
    with pytest.raises(ImportError, match=r"pip install '\.\[stream\]'.*data.workers=0"):
        data.worker_count(_data_config(workers=2))


def test_a_streamed_folder_is_its_cache_decoded_per_batch(tmp_path):
    """data.pipeline="stream" on a folder: the same names, labels, paths and pixels as the
    cache, nothing written to the cache folder; an unreadable file is replaced, not fatal."""
    from PIL import Image

    faces = data.load_synthetic(num_identities=4, images_per_identity=3, image_size=20, seed=1)
    root = tmp_path / "faces"
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        (root / f"p{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"p{label}" / f"{i}.png")
    (root / "p9").mkdir()
    Image.fromarray(faces.images[0]).save(root / "p9" / "alone.png")  # 1 image: excluded
    config = ml_collections.ConfigDict(dict(
        source="folder", root=str(root), image_size=16, center_crop=0.8,
        cache_dir=str(tmp_path / "cache"), skip_bad_files=False, min_images_per_identity=2,
        pipeline="stream"))
    streamed = data.load_dataset(config)
    assert isinstance(streamed.images.base, data.FolderImages)  # p9 left out: a RowSubset
    assert not (tmp_path / "cache").exists()
    config.pipeline = None
    cached = data.load_dataset(config)
    assert streamed.identity_names == cached.identity_names == ["p0", "p1", "p2", "p3"]
    assert streamed.paths == cached.paths
    np.testing.assert_array_equal(streamed.labels, cached.labels)
    np.testing.assert_array_equal(np.asarray(streamed.images), np.asarray(cached.images))
    (root / "p1" / "4.png").write_bytes(b"broken")  # p1's 2nd image
    config.pipeline = "stream"
    damaged = data.load_dataset(config).images
    np.testing.assert_array_equal(damaged[4], damaged[5])
    assert damaged.base.replaced == 1
