"""Image folders: formats, preprocessing, the memory-mapped cache, bad files, real datasets."""

import concurrent.futures
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from facenet_jax import data


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _solid(value, shape=(20, 16, 3)):
    return np.full(shape, value, np.uint8)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "faces"
    _save(root / "alice" / "a1.png", _solid((200, 10, 10)))
    _save(root / "alice" / "a2.JPG", _solid((200, 10, 10)), quality=100)
    _save(root / "alice" / "a3.bmp", _solid((200, 10, 10)))
    _save(root / "bob" / "b1.pgm", _solid(90, (20, 16)))  # grayscale PGM
    _save(root / "bob" / "b2.png", np.dstack([_solid((0, 0, 250)), _solid(255, (20, 16, 1))]))
    _save(root / "zoë" / "é 1.ppm", _solid((5, 250, 5)))  # non-ASCII names
    _save(root / "zoë" / "é 2.png", _solid((5, 250, 5)))
    _save(root / "carol" / "only.png", _solid(30))  # one image: excluded from training
    (root / "alice" / ".hidden.png").write_bytes(b"junk")
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    _save(root / ".cache" / "x.png", _solid(1))
    (root / "README").write_text("top-level files are ignored")
    return root


def test_formats_modes_and_layout(folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        ds = data.load_image_folder(folder, 8, cache_dir=tmp_path / "cache")
    assert "excluded 1 identities" in caplog.text
    assert ds.identity_names == ["alice", "bob", "zoë"]
    assert ds.images.shape == (7, 8, 8, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 2, 2])
    assert [os.path.basename(p) for p in ds.paths] == [
        "a1.png", "a2.JPG", "a3.bmp", "b1.pgm", "b2.png", "é 1.ppm", "é 2.png"]
    np.testing.assert_allclose(ds.images[0].reshape(-1, 3).mean(0), (200, 10, 10), atol=1)
    np.testing.assert_allclose(ds.images[1].reshape(-1, 3).mean(0), (200, 10, 10), atol=3)
    assert np.all(ds.images[3] == 90)  # grayscale expanded to RGB
    np.testing.assert_array_equal(ds.images[4][0, 0], (0, 0, 250))  # RGBA: alpha dropped
    kept_singles = data.load_image_folder(folder, 8, cache_dir=tmp_path / "cache",
                                          min_images_per_identity=1)
    assert kept_singles.identity_names == ["alice", "bob", "carol", "zoë"]


def test_resize_and_center_crop_against_pil(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    _save(tmp_path / "r" / "p" / "x.png", image)
    _save(tmp_path / "r" / "p" / "y.png", image)
    ds = data.load_image_folder(tmp_path / "r", 10, center_crop=0.5, cache_dir=tmp_path / "c")
    expected = Image.fromarray(image).crop((5, 10, 15, 20)).resize(
        (10, 10), Image.Resampling.BILINEAR)  # central 10×10 of the 20-px shorter side
    np.testing.assert_array_equal(ds.images[0], np.asarray(expected))
    whole = data.load_images([tmp_path / "r" / "p" / "x.png"], 10)
    np.testing.assert_array_equal(whole[0], np.asarray(Image.fromarray(image).resize(
        (10, 10), Image.Resampling.BILINEAR)))


def test_cache_is_reused_and_keyed_by_contents_and_preprocessing(folder, tmp_path):
    cache = tmp_path / "cache"
    first = data.load_image_folder(folder, 8, cache_dir=cache)
    # carol (one image) is excluded: the rest is read lazily from the memory-mapped cache
    assert isinstance(first.images, data.RowSubset) and isinstance(first.images.base, np.memmap)
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    again = data.load_image_folder(folder, 8, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    data.load_image_folder(folder, 8, center_crop=0.8, cache_dir=cache)
    data.load_image_folder(folder, 12, cache_dir=cache)
    _save(folder / "bob" / "b3.png", _solid(7))  # contents changed
    changed = data.load_image_folder(folder, 8, cache_dir=cache)
    assert len(changed.labels) == 8
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_unset_cache_dir_caches_where_the_environment_says_else_in_home(folder, tmp_path,
                                                                        monkeypatch):
    from facenet_jax.data import folder as folder_module

    monkeypatch.setenv(folder_module.CACHE_DIR_ENV, str(tmp_path / "env_cache"))
    data.load_image_folder(folder, 8)
    assert [p.name.startswith(f"{folder.name}-8px-")
            for p in (tmp_path / "env_cache").iterdir() if p.is_dir()] == [True]
    monkeypatch.delenv(folder_module.CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert folder_module.default_cache_dir() == tmp_path / "home" / ".cache" / "facenet_jax"


def _load_in_subprocess(args):
    root, cache = args
    ds = data.load_image_folder(root, 8, cache_dir=cache)
    return np.asarray(ds.images).sum()


def test_concurrent_builders_agree_and_leave_one_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sums = pool.map(_load_in_subprocess, [(folder, cache)] * 3)
    assert len(set(sums)) == 1
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def _entry_name(folder, cache):
    """The cache entry `load_image_folder(folder, 8)` builds, and its images."""
    images = np.asarray(data.load_image_folder(folder, 8, cache_dir=cache).images)
    (entry,) = [p.name for p in cache.iterdir() if p.is_dir()]
    return entry, images


def test_leftovers_of_killed_builds_are_removed_by_the_next_build(folder, tmp_path, caplog):
    entry, expected = _entry_name(folder, tmp_path / "reference")
    cache = tmp_path / "cache"
    for pid in (111, 222):  # two earlier builds killed before their cleanup ran
        (cache / f"{entry}.tmp{pid}").mkdir(parents=True)
        (cache / f"{entry}.tmp{pid}" / "images.npy").write_bytes(b"\1" * 300_000)
    other = cache / "other-8px-0123456789abcdef0123.tmp333"  # another entry's build
    other.mkdir()
    with caplog.at_level(logging.WARNING):
        ds = data.load_image_folder(folder, 8, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(ds.images), expected)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [entry, other.name]
    assert all(f"{entry}.tmp{pid} (" in caplog.text for pid in (111, 222))
    assert "MiB on disk), left by an interrupted cache build" in caplog.text


_HOLD_LOCK_AND_BUILD = """
import fcntl, os, pathlib, sys, time
cache, entry = pathlib.Path(sys.argv[1]), sys.argv[2]
lock = open(cache / f"{entry}.lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)
tmp = cache / f"{entry}.tmp{os.getpid()}"
tmp.mkdir()
(tmp / "images.npy").write_bytes(bytes(4096))
print(tmp, flush=True)
time.sleep(300)
"""


def test_a_waiting_process_deletes_nothing_and_cleans_up_after_a_killed_builder(folder,
                                                                               tmp_path):
    entry, expected = _entry_name(folder, tmp_path / "reference")
    cache = tmp_path / "cache"
    cache.mkdir()
    with (subprocess.Popen([sys.executable, "-c", _HOLD_LOCK_AND_BUILD, cache, entry],
                           stdout=subprocess.PIPE, text=True) as builder,
          concurrent.futures.ThreadPoolExecutor(1) as pool):
        try:
            building = builder.stdout.readline().strip()  # the builder holds the lock
            waiter = pool.submit(data.load_image_folder, folder, 8, cache_dir=cache)
            time.sleep(1.0)
            assert not waiter.done()  # blocked on the lock ...
            assert os.path.exists(os.path.join(building, "images.npy"))  # ... deleting nothing
        finally:
            builder.kill()  # SIGKILL: no cleanup runs, the kernel releases the lock
            builder.wait()
        ds = waiter.result(timeout=120)
    np.testing.assert_array_equal(np.asarray(ds.images), expected)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [entry]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", "truncated"])
def test_bad_file_names_the_file_unless_skipped(folder, tmp_path, caplog, content):
    bad = folder / "bob" / "bad.png"
    if content == "truncated":
        _save(bad, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    with pytest.raises(data.BadImageError, match="bad.png.*skip_bad_files"):
        data.load_image_folder(folder, 8, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # nothing half-written left
    with caplog.at_level(logging.WARNING):
        ds = data.load_image_folder(folder, 8, cache_dir=tmp_path / "cache",
                                    skip_bad_files=True)
    assert "bad.png" in caplog.text
    assert len(ds.labels) == 7 and not any(p.endswith("bad.png") for p in ds.paths)
    assert np.all(np.asarray(ds.images)[3] == 90)  # rows after the skipped file line up


def test_missing_and_empty_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "nowhere", 8, cache_dir=tmp_path / "c")
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        data.load_image_folder(tmp_path / "empty", 8, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="center_crop"):
        data.load_image_folder(tmp_path / "empty", 8, center_crop=1.5)


@pytest.mark.parametrize("name, identities, images", [
    ("orl_faces", 40, 400), ("extended_yaleb", 38, 2414)])
def test_shared_real_datasets(shared_data, tmp_path, name, identities, images):
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ds = data.load_image_folder(root, 16, cache_dir=tmp_path / "cache")
    assert ds.num_identities == identities and len(ds.labels) == images
    assert ds.images.shape == (images, 16, 16, 3)
    gray = np.asarray(ds.images)
    assert np.array_equal(gray[..., 0], gray[..., 2])  # grayscale sources
    pairs = data.generate_pairs(ds, num_folds=10, pairs_per_fold=300, seed=0)
    assert len(pairs) > 0 and pairs.is_same.mean() == 0.5
    splits = data.split_identities(ds, fractions=(0.8, 0.1, 0.1), seed=0)
    sampler = data.PKSampler(splits["train"], identities=8, images_per_identity=4, seed=0)
    batch_images, labels = sampler.batch(0)
    assert batch_images.shape == (32, 16, 16, 3) and len(set(labels)) == 8
