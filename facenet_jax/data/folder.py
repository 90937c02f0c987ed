"""Image folders `root/<identity>/<image>`, decoded once into a memory-mapped cache on disk
(or, with data.pipeline="stream", decoded as batches read them: FolderImages).

The cache is keyed by the folder's contents (relative paths, sizes, modification times) and the
preprocessing, built aside and renamed into place under a file lock, so concurrent processes
(many hosts) never read a half-written cache and the second run starts at once. The folder of a
build that was killed (SIGKILL, out of memory) is deleted by the next build of that entry.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from facenet_jax.data.dataset import (DATA_SOURCES, BadImageError, Dataset, DecodedOnAccess,
                                      RowSubset)
from facenet_jax.runfiles import blocking_lock

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pnm", ".pbm", ".bmp")
_CACHE_VERSION = 1  # bump when decoding or the cache layout changes
CACHE_DIR_ENV = "FACENET_JAX_CACHE_DIR"  # where data.cache_dir=None caches decoded folders


def default_cache_dir() -> pathlib.Path:
    """The folder cache when data.cache_dir is unset: $FACENET_JAX_CACHE_DIR, else
    ~/.cache/facenet_jax (read at each call: a test session points it at its own folder)."""
    return pathlib.Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/facenet_jax").expanduser()


def decode_image(path: str | pathlib.Path, image_size: int,
                 center_crop: float | None = None) -> np.ndarray:
    """One file → uint8 [S,S,3]: any mode to RGB (grayscale repeated, alpha dropped),
    optionally the central square of `center_crop` × the shorter side, then resized to S×S
    (without a crop the whole image is resized, aspect ratio not kept)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here
            return _preprocess(img, image_size, center_crop)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as error:
        raise BadImageError(f"cannot decode image {path}: {error}. Fix or remove the file, or "
                            "set data.skip_bad_files=True (skip_bad_files=True) to skip "
                            "unreadable files with a log line each") from error


def resize_array(image: np.ndarray, image_size: int, center_crop: float | None = None
                 ) -> np.ndarray:
    """A decoded image uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] → uint8 [S,S,3], preprocessed
    exactly as files are."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return _preprocess(Image.fromarray(image), image_size, center_crop)


def _preprocess(img: Image.Image, image_size: int, center_crop: float | None) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float PGM and PNG
        pixels = np.asarray(img, np.float32)
        img = Image.fromarray(np.uint8(255 * pixels / max(float(pixels.max()), 1.0)))
    img = img.convert("RGB")
    if center_crop is not None:
        side = center_crop * min(img.size)
        left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
        img = img.crop((round(left), round(top), round(left + side), round(top + side)))
    return np.asarray(img.resize((image_size, image_size), Image.Resampling.BILINEAR))


def load_images(paths: Sequence[str | pathlib.Path], image_size: int,
                center_crop: float | None = None) -> np.ndarray:
    """Decodes files in parallel with the folder preprocessing → uint8 [N,S,S,3] in memory."""
    _check_preprocessing(image_size, center_crop)
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
    for i, image in _decode_all(paths, image_size, center_crop, progress=False):
        if isinstance(image, BadImageError):
            raise image
        images[i] = image
    return images


def scan_folder(root: str | pathlib.Path, *, role: str = "data root",
                fix: str = "set data.root to") -> tuple[list[str], list[str]]:
    """Identity folders and image files under root, sorted; hidden and non-image files ignored.

    Returns (relative paths `identity/file`, identity names of the folders that hold images).
    A missing root is a FileNotFoundError saying "ROLE ROOT does not exist ...; FIX a folder
    laid out as root/<identity>/<image>" (the caller names its own setting).
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{role} {root} does not exist or is not a folder; {fix} a "
                                "folder laid out as root/<identity>/<image>")
    paths, names = [], []
    for identity in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        files = sorted(f.name for f in identity.iterdir()
                       if f.is_file() and _visible(f)
                       and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            names.append(identity.name)
            paths.extend(f"{identity.name}/{f}" for f in files)
    if not paths:
        raise ValueError(f"no images found under {root}: expected root/<identity>/<image> with "
                         f"extensions {', '.join(IMAGE_EXTENSIONS)}")
    return paths, names


class FolderImages(DecodedOnAccess):
    """An image folder's files as a read-only uint8 [N,S,S,3] array decoded on access (see
    DecodedOnAccess: an unreadable file is replaced by its identity's next readable one)."""

    def __init__(self, root: pathlib.Path, relative: Sequence[str], labels: np.ndarray,
                 identity_names: Sequence[str], image_size: int, center_crop: float | None):
        super().__init__(labels, identity_names, image_size)
        self.root, self.relative, self.center_crop = root, list(relative), center_crop

    def describe(self, row: int) -> str:
        return str(self.root / self.relative[row])

    def decode(self, row: int) -> np.ndarray:
        return decode_image(self.root / self.relative[row], self.image_size, self.center_crop)


def load_image_folder(root: str | pathlib.Path, image_size: int, *,
                      center_crop: float | None = None,
                      cache_dir: str | pathlib.Path | None = None,
                      skip_bad_files: bool = False,
                      min_images_per_identity: int = 2, stream: bool = False) -> Dataset:
    """root/<identity>/<image> → Dataset whose images are a read-only memory map of the cache.

    Identities with fewer than `min_images_per_identity` decodable images are excluded (logged
    count). A corrupt file is a BadImageError naming it, unless `skip_bad_files` (each logged).
    stream: no cache; the images are FolderImages, decoded as batches read them (identities
    counted by their files; an unreadable file is replaced by its identity's next image).
    """
    _check_preprocessing(image_size, center_crop)
    root = pathlib.Path(root).expanduser().resolve()
    relative, _ = scan_folder(root)
    if stream:
        return _with_min_images(_stream_folder(root, relative, image_size, center_crop), root,
                                min_images_per_identity)
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = _cache_key(root, relative, image_size, center_crop, skip_bad_files)
    entry = cache_dir / f"{root.name}-{image_size}px-{key[:20]}"
    if not (entry / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with blocking_lock(cache_dir / f"{entry.name}.lock"):
            if not (entry / "meta.json").exists():  # another process may have built it
                _build_cache(root, relative, entry, image_size, center_crop, skip_bad_files)
    return _with_min_images(_open_cache(root, entry), root, min_images_per_identity)


def _with_min_images(dataset: Dataset, root: pathlib.Path, min_images_per_identity: int
                     ) -> Dataset:
    dataset, dropped = dataset.with_min_images(max(min_images_per_identity, 1))
    if dropped:
        logging.info("%s: excluded %d identities with fewer than %d images", root, dropped,
                     min_images_per_identity)
    if dataset.num_identities == 0:
        raise ValueError(f"no identity under {root} has {min_images_per_identity} or more "
                         "readable images")
    return dataset


def _stream_folder(root: pathlib.Path, relative: list[str], image_size: int,
                   center_crop: float | None) -> Dataset:
    identity = [p.split("/", 1)[0] for p in relative]
    names = sorted(set(identity))
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[n] for n in identity], np.int32)  # sorted: identity-major
    return Dataset(images=FolderImages(root, relative, labels, names, image_size, center_crop),
                   labels=labels, identity_names=names, paths=[str(root / p) for p in relative])


def _check_preprocessing(image_size: int, center_crop: float | None) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if center_crop is not None and not 0 < center_crop <= 1:
        raise ValueError(f"center_crop={center_crop} must lie in (0, 1] (the fraction of the "
                         "shorter side kept) or be None")


def _visible(path: pathlib.Path) -> bool:
    return not path.name.startswith(".")


def _cache_key(root: pathlib.Path, relative: list[str], image_size: int,
               center_crop: float | None, skip_bad_files: bool) -> str:
    digest = hashlib.sha256(json.dumps(
        [_CACHE_VERSION, image_size, center_crop, skip_bad_files]).encode())
    for rel in relative:
        stat = (root / rel).stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode_all(paths: Sequence[str | pathlib.Path], image_size: int,
                center_crop: float | None, progress: bool
                ) -> Iterator[tuple[int, np.ndarray | BadImageError]]:
    """Yields (index, image or the BadImageError) in order; PIL decodes outside the GIL."""
    def decode(path: str | pathlib.Path) -> np.ndarray | BadImageError:
        try:
            return decode_image(path, image_size, center_crop)
        except BadImageError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(min(32, 2 * (os.cpu_count() or 1))) as pool:
        results = pool.map(decode, paths, chunksize=64)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(paths), desc="decoding images", unit="img",
                           mininterval=1.0)
        yield from enumerate(results)


def _remove_leftover_builds(entry: pathlib.Path) -> None:
    """Deletes the `<entry>.tmp*` folders of earlier builds that were killed before their
    cleanup ran. Only under the entry's lock: its holder is the only process that builds it."""
    leftovers = [path for path in entry.parent.iterdir()
                 if path.name.startswith(f"{entry.name}.tmp") and path.is_dir()]
    for leftover in leftovers:
        size = sum(f.stat().st_blocks * 512 for f in leftover.rglob("*") if f.is_file())
        logging.warning("removing %s (%.1f MiB on disk), left by an interrupted cache build",
                        leftover, size / 2**20)
        shutil.rmtree(leftover, ignore_errors=True)


def _build_cache(root: pathlib.Path, relative: list[str], entry: pathlib.Path, image_size: int,
                 center_crop: float | None, skip_bad_files: bool) -> None:
    """Decodes every image into entry/images.npy (uint8 [N,S,S,3]) + meta.json, written in
    a temporary folder and renamed into place (atomic: readers never see a partial cache).
    The caller holds the entry's lock."""
    _remove_leftover_builds(entry)
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        shape = (len(relative), image_size, image_size, 3)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=shape)
        good = np.ones(len(relative), bool)
        for i, image in _decode_all([root / r for r in relative], image_size, center_crop,
                                    progress=True):
            if isinstance(image, BadImageError):
                if not skip_bad_files:
                    raise image
                logging.warning("skipping unreadable image: %s", image)
                good[i] = False
            else:
                images[i] = image
        images.flush()
        del images
        # Skipped files keep their (unused) rows: meta.json lists the rows that hold images.
        meta = {"version": _CACHE_VERSION, "rows": np.flatnonzero(good).tolist(),
                "paths": [r for r, ok in zip(relative, good) if ok],
                "skipped": [r for r, ok in zip(relative, good) if not ok]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():  # built meanwhile by a process that did not take the lock
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_cache(root: pathlib.Path, entry: pathlib.Path) -> Dataset:
    meta = json.loads((entry / "meta.json").read_text())
    relative = meta["paths"]
    identity = [p.split("/", 1)[0] for p in relative]
    names = sorted(set(identity))
    index = {name: i for i, name in enumerate(names)}
    images = np.load(entry / "images.npy", mmap_mode="r")
    if len(meta["rows"]) < len(images):
        images = RowSubset(images, np.asarray(meta["rows"]))
    return Dataset(images=images, labels=np.array([index[n] for n in identity], np.int32),
                   identity_names=names, paths=[str(root / p) for p in relative])


def load_folder_as_configured(root: str | pathlib.Path, data_config: Any, *,
                              min_images_per_identity: int) -> Dataset:
    """An image folder preprocessed as `config.data` says (size, crop, cache folder, bad
    files): a run's training folder, or a folder its trained encoder evaluates or embeds."""
    return load_image_folder(
        pathlib.Path(root), data_config.image_size, center_crop=data_config.center_crop,
        cache_dir=data_config.cache_dir, skip_bad_files=data_config.skip_bad_files,
        min_images_per_identity=min_images_per_identity)


@DATA_SOURCES.register("folder")
def folder_as_configured(data_config: Any) -> Dataset:
    """The training folder `config.data.root` (root/<identity>/<image>)."""
    if not data_config.root:
        raise ValueError("data.source='folder' needs data.root: a folder laid out as "
                         "root/<identity>/<image>; pass --config.data.root=PATH")
    if data_config.get("pipeline") != "stream":
        return load_folder_as_configured(
            data_config.root, data_config,
            min_images_per_identity=data_config.get("min_images_per_identity", 2))
    return load_image_folder(
        data_config.root, data_config.image_size, center_crop=data_config.center_crop,
        min_images_per_identity=data_config.get("min_images_per_identity", 2), stream=True)
