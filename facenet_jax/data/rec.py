"""insightface's RecordIO packs (`train.rec`, `train.idx`, `property`) as a data source, read
natively (no mxnet): `data.source = "rec"`, `data.root` = the pack's folder (or its .rec file).

The identity index comes from the pack's identity records when it has them (record 0 holds no
image and a label vector [lo, hi): records lo..hi-1 each hold one identity's [first, last) image record ids, as
insightface writes MS1MV2, MS1MV3, Glint360K), or else from every image's header label (record
0 a plain image), read without decoding any image and cached beside the pack in
`<rec>.labels.npz` (rebuilt when the .rec or .idx changes). Identity names are the labels
written `f"{label:07d}"`; an image's number (pairs files) is its 1-based position within its
identity. Images are decoded when a batch reads them (`PackImages`); one that fails to decode
is replaced by the identity's next readable image, counted and logged.

    python -m facenet_jax.data.rec convert FOLDER PACK_DIR   # an image folder → a pack
    python -m facenet_jax.data.rec list PACK_DIR              # its identities and counts
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import pathlib
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # the `stream` extra's JPEG decoder; PIL decodes without it
    import simplejpeg
except ImportError:
    simplejpeg = None

from facenet_jax.data.alignment import ALIGNMENT_RECORD, read_alignment_record
from facenet_jax.data.dataset import DATA_SOURCES, Dataset, DecodedOnAccess
from facenet_jax.data.folder import (BadImageError, _check_preprocessing, _decode_all,
                                     _preprocess, _with_min_images, scan_folder)
from facenet_jax.data.recordio import (PackWriter, RecordFile, RecordHeader, RecordIOError,
                                       pack_record, read_index, unpack_record)
from facenet_jax.runfiles import atomic_write_with

REC_FILE, IDX_FILE, PROPERTY_FILE = "train.rec", "train.idx", "property"
LABELS_FILE = "labels.tsv"  # written by `convert`: label <TAB> the folder's identity name
PACK_ALIGNMENT = "landmarks"  # insightface's packs: 112 px crops aligned by 5 landmarks
_LABEL_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PackIndex:
    """Where a pack's images are, identity-major: record ids and byte offsets int64 [N],
    identity of each image int32 [N] (0..C-1, rows of one identity contiguous, in record
    order), each identity's label int64 [C] (its name's number); property's (classes,
    height, width) or None; whether identity records gave the index."""

    record_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    identity_labels: np.ndarray
    property: tuple[int, int, int] | None
    identity_records: bool

    @property
    def identity_names(self) -> list[str]:
        return [f"{label:07d}" for label in self.identity_labels]


def pack_files(root: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(.rec, .idx, property) of a pack folder (train.rec ...) or of a path to its .rec file
    (NAME.idx beside it); FileNotFoundError naming what is missing."""
    root = pathlib.Path(root).expanduser()
    rec = root if root.suffix == ".rec" else root / REC_FILE
    idx = rec.with_suffix(".idx")
    for path, role in ((rec, "records"), (idx, "record offsets")):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} ({role}) not found; data.root must be an insightface pack folder "
                f"holding {REC_FILE}, {IDX_FILE} and {PROPERTY_FILE}, or the path of a .rec "
                "file with its .idx beside it (`python -m facenet_jax.data.rec convert` makes "
                "one from an image folder)")
    return rec, idx, rec.parent / PROPERTY_FILE


def read_property(path: pathlib.Path) -> tuple[int, int, int] | None:
    """insightface's `property` file: "classes,height,width" → ints; None when absent."""
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: {text!r}, expected 'classes,height,width' "
                         "(e.g. 85742,112,112)") from None
    return classes, height, width


def load_index(rec: pathlib.Path, idx: pathlib.Path, property_path: pathlib.Path) -> PackIndex:
    """The identity index of a pack (see the module docstring), offsets checked: an offset
    that does not land on a record is a RecordIOError naming the file and offset, now rather
    than when a batch reads it."""
    record_ids, offsets = read_index(idx)
    if not len(record_ids):
        raise RecordIOError(f"{idx}: no records listed")
    offset_of = dict(zip(record_ids.tolist(), offsets.tolist()))
    if 0 not in offset_of:
        raise RecordIOError(f"{idx}: no record 0 (the pack's header record)")
    records = RecordFile(rec)
    try:
        records.check_record_starts(offsets)
        header0, payload0 = unpack_record(records.read(offset_of[0]),
                                          f"{rec}: record 0 at offset {offset_of[0]}")
        if header0.flag >= 2 and not payload0:  # else record 0 is an image
            index = _index_from_identity_records(records, offset_of, header0, idx)
        else:
            index = _index_from_labels(records, record_ids, offsets)
    finally:
        records.close()
    return dataclasses.replace(index, property=read_property(property_path))


def _index_from_identity_records(records: RecordFile, offset_of: dict[int, int],
                                 header0: RecordHeader, idx: pathlib.Path) -> PackIndex:
    low, high = int(header0.label[0]), int(header0.label[1])
    ids, identity_labels = [], []
    for record_id in range(low, high):
        header = _header(records, offset_of, record_id, idx)
        if header.flag < 2:
            raise RecordIOError(f"{records.path}: identity record {record_id} (record 0 gives "
                                f"the identity range [{low}, {high})) has no [first, last) "
                                "label pair")
        first, last = int(header.label[0]), int(header.label[1])
        if first >= last:
            continue  # an identity without images: no rows, no name
        ids.append(np.arange(first, last, dtype=np.int64))
        identity_labels.append(_integer_label(_header(records, offset_of, first, idx), records,
                                              offset_of[first]))
    if not ids:
        raise RecordIOError(f"{records.path}: identity records {low}..{high - 1} list no image")
    record_ids = np.concatenate(ids)
    missing = [int(i) for i in record_ids if int(i) not in offset_of]
    if missing:
        raise RecordIOError(f"{idx}: {len(missing)} image records named by the identity "
                            f"records are not listed, e.g. {missing[:5]}")
    return PackIndex(
        record_ids=record_ids,
        offsets=np.fromiter((offset_of[int(i)] for i in record_ids), np.int64, len(record_ids)),
        labels=np.repeat(np.arange(len(ids), dtype=np.int32), [len(i) for i in ids]),
        identity_labels=np.asarray(identity_labels, np.int64), property=None,
        identity_records=True)


def _header(records: RecordFile, offset_of: dict[int, int], record_id: int,
            idx: pathlib.Path) -> RecordHeader:
    if record_id not in offset_of:
        raise RecordIOError(f"{idx}: record {record_id} is not listed")
    return records.read_header(offset_of[record_id])


def _integer_label(header: RecordHeader, records: RecordFile, offset: int) -> int:
    label = header.class_label
    if not (label >= 0 and label == int(label)):
        raise RecordIOError(f"{records.path}: record at offset {offset} has label {label}, "
                            "expected a non-negative whole number (the identity)")
    return int(label)


def _index_from_labels(records: RecordFile, record_ids: np.ndarray,
                       offsets: np.ndarray) -> PackIndex:
    """Every record is an image: identities from each header's label (cached)."""
    cache = records.path.with_name(records.path.name + ".labels.npz")
    key = _pack_key(records.path, records.path.with_suffix(".idx"))
    labels = _read_label_cache(cache, key, len(record_ids))
    if labels is None:
        logging.info("%s has no identity records: reading the labels of its %d images "
                     "(once; cached in %s)", records.path, len(record_ids), cache)
        labels = np.fromiter((_integer_label(records.read_header(o), records, o)
                              for o in offsets.tolist()), np.int64, len(offsets))
        try:
            atomic_write_with(cache, lambda f: np.savez(f, key=np.asarray(key),
                                                        labels=labels))
        except OSError as error:  # a read-only pack folder: index again next time
            logging.warning("cannot cache the label index in %s (%s)", cache, error)
    order = np.lexsort((record_ids, labels))
    identity_labels, identity = np.unique(labels[order], return_inverse=True)
    return PackIndex(record_ids=record_ids[order], offsets=offsets[order],
                     labels=identity.astype(np.int32), identity_labels=identity_labels,
                     property=None, identity_records=False)


def _pack_key(rec: pathlib.Path, idx: pathlib.Path) -> str:
    """Changes when either file is rewritten (size, modification time)."""
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (rec, idx)]
    return json.dumps([_LABEL_CACHE_VERSION, stats])


def _read_label_cache(path: pathlib.Path, key: str, count: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            if str(cached["key"]) == key and len(cached["labels"]) == count:
                return cached["labels"]
    except (OSError, ValueError, KeyError) as error:
        logging.warning("ignoring unreadable label cache %s (%s)", path, error)
        return None
    logging.info("%s is out of date (the pack changed): indexing again", path)
    return None


class PackImages(DecodedOnAccess):
    """A pack's images as a read-only uint8 [N,S,S,3] array decoded on access (see
    DecodedOnAccess: an unreadable image is replaced by its identity's next readable one),
    preprocessed as image folders are (`data.image_size`, `data.center_crop`)."""

    def __init__(self, rec: str | pathlib.Path, index: PackIndex, image_size: int,
                 center_crop: float | None = None):
        _check_preprocessing(image_size, center_crop)
        super().__init__(index.labels, index.identity_names, image_size)
        self.records = RecordFile(rec)
        self.record_ids, self.offsets = index.record_ids, index.offsets
        self.center_crop = center_crop

    def describe(self, row: int) -> str:
        return f"{self.records.path}: record {self.record_ids[row]}"

    def decode(self, row: int) -> np.ndarray:
        offset = int(self.offsets[row])
        where = f"{self.describe(row)} at offset {offset}"
        _, payload = unpack_record(self.records.read(offset), where)
        pixels = _decode_jpeg_fast(payload)
        if pixels is not None and pixels.shape[0] == pixels.shape[1] == self.image_size \
                and self.center_crop is None:
            return pixels  # what _preprocess would return: RGB, already at size
        try:
            if pixels is not None:
                return _preprocess(Image.fromarray(pixels), self.image_size, self.center_crop)
            with Image.open(io.BytesIO(payload)) as img:
                img.load()
                return _preprocess(img, self.image_size, self.center_crop)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
                ValueError) as error:
            raise BadImageError(f"cannot decode the image of {where}: {error}") from error


def _decode_jpeg_fast(payload: bytes) -> np.ndarray | None:
    """uint8 [H,W,3] of a JPEG by simplejpeg (libjpeg-turbo, about twice PIL's images/s at
    112 px, the same pixels: tests/test_data_rec.py), or None: simplejpeg not installed (the
    `stream` extra), not a JPEG, or one it cannot read (PIL then decides)."""
    if simplejpeg is None or not payload.startswith(b"\xff\xd8"):
        return None
    try:
        # strict: a truncated or damaged JPEG fails here as it fails in PIL (libjpeg-turbo
        # would otherwise fill the missing part grey), whichever decoder is installed
        return simplejpeg.decode_jpeg(payload, colorspace="RGB", strict=True)
    except ValueError:
        return None


def load_pack(root: str | pathlib.Path, image_size: int, *, center_crop: float | None = None,
              min_images_per_identity: int = 2) -> Dataset:
    """A pack → Dataset whose images decode on access (PackImages); identities with fewer than
    `min_images_per_identity` images are excluded (logged count)."""
    rec, idx, property_path = pack_files(root)
    index = load_index(rec, idx, property_path)
    if index.property is not None:
        classes, height, width = index.property
        if height != width:
            raise ValueError(f"{property_path}: {height}×{width} images; packs of square "
                             "crops only")
        if classes != len(index.identity_labels):
            logging.warning("%s says %d classes, the pack holds %d identities with images",
                            property_path, classes, len(index.identity_labels))
    images = PackImages(rec, index, image_size, center_crop)
    dataset = Dataset(images=images, labels=index.labels, identity_names=index.identity_names)
    logging.info("%s: %d images of %d identities (%s)", rec, len(dataset.labels),
                 dataset.num_identities,
                 "identity records" if index.identity_records else "header labels")
    return _with_min_images(dataset, rec, min_images_per_identity)


def pack_alignment(root: str | pathlib.Path) -> str:
    """The crops a pack holds: its folder's alignment.json mode (packs this module converts
    from an aligned folder), else insightface's "landmarks"."""
    record = read_alignment_record(pack_files(root)[0].parent)
    return record.get("mode", PACK_ALIGNMENT) if record else PACK_ALIGNMENT


def rec_as_configured(data_config: Any) -> Dataset:
    """The pack `config.data.root` (an insightface RecordIO folder)."""
    if not data_config.root:
        raise ValueError("data.source='rec' needs data.root: an insightface pack folder "
                         f"({REC_FILE}, {IDX_FILE}, {PROPERTY_FILE}); pass "
                         "--config.data.root=PACK_DIR")
    expected, held = data_config.get("alignment"), pack_alignment(data_config.root)
    if expected is not None and expected != held:
        raise ValueError(f"{data_config.root} holds {held!r}-aligned crops but "
                         f"data.alignment={expected!r}; set --config.data.alignment={held}")
    return load_pack(data_config.root, data_config.image_size,
                     center_crop=data_config.center_crop,
                     min_images_per_identity=data_config.get("min_images_per_identity", 2))


def convert_folder(folder: str | pathlib.Path, pack_dir: str | pathlib.Path, *,
                   image_size: int, quality: int = 95, identity_records: bool = True) -> int:
    """root/<identity>/<image> → PACK_DIR/{train.rec, train.idx, property, labels.tsv}
    (+ alignment.json when the folder has one). Images are decoded and resized as image
    folders are (in parallel threads), then JPEG-encoded; identity k (folders sorted) gets label k, and labels.tsv
    maps each label to its folder's name. Returns the image count."""
    folder, pack_dir = pathlib.Path(folder), pathlib.Path(pack_dir)
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must lie in [1, 100], got {quality}")
    relative, names = scan_folder(folder)
    label_of = {name: k for k, name in enumerate(names)}
    labels = [label_of[r.split("/", 1)[0]] for r in relative]
    encoded = (_encoded(image, quality) for _, image in
               _decode_all([folder / path for path in relative], image_size, None,
                           progress=True))
    write_pack(pack_dir, encoded, labels, image_size=image_size,
               identity_records=identity_records)
    (pack_dir / LABELS_FILE).write_text("".join(f"{k:07d}\t{name}\n"
                                                for k, name in enumerate(names)))
    if (folder / ALIGNMENT_RECORD).is_file():
        shutil.copyfile(folder / ALIGNMENT_RECORD, pack_dir / ALIGNMENT_RECORD)
    return len(relative)


def _encoded(image: np.ndarray | BadImageError, quality: int) -> bytes:
    if isinstance(image, BadImageError):
        raise image
    return encode_jpeg(image, quality)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H,W,3] → JPEG bytes (what insightface's packs hold)."""
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="JPEG", quality=quality)
    return encoded.getvalue()


def write_pack(pack_dir: str | pathlib.Path, encoded_images: Iterable[bytes],
               labels: Sequence[int], *, image_size: int, identity_records: bool = True) -> None:
    """PACK_DIR/{train.rec, train.idx, property} from encoded images and their labels
    (non-decreasing ints 0..C-1, every label present). identity_records: insightface's layout
    (record 0's label [N+1, N+1+C], images 1..N, identity records N+1..N+C each labelled with
    its [first, last) image ids); without: images 0..N-1 only."""
    pack_dir = pathlib.Path(pack_dir)
    labels = np.asarray(labels, np.int64)
    num_identities = int(labels.max()) + 1 if len(labels) else 0
    if np.any(np.diff(labels) < 0) or len(np.unique(labels)) != num_identities:
        raise ValueError("write_pack: labels must be non-decreasing and cover 0..C-1")
    if (pack_dir / REC_FILE).exists():
        raise FileExistsError(f"{pack_dir / REC_FILE} exists; choose a new pack folder")
    pack_dir.mkdir(parents=True, exist_ok=True)
    count, first_id = len(labels), 1 if identity_records else 0
    with PackWriter(pack_dir / REC_FILE, pack_dir / IDX_FILE) as writer:
        if identity_records:
            writer.write(0, pack_record([count + 1, count + 1 + num_identities]))
        for i, (payload, label) in enumerate(zip(encoded_images, labels.tolist(), strict=True)):
            writer.write(first_id + i, pack_record(float(label), payload, id=first_id + i))
        if identity_records:
            starts = np.searchsorted(labels, np.arange(num_identities + 1)) + first_id
            for k in range(num_identities):
                record_id = count + 1 + k
                writer.write(record_id, pack_record([starts[k], starts[k + 1]], id=record_id))
    (pack_dir / PROPERTY_FILE).write_text(f"{num_identities},{image_size},{image_size}\n")


def describe_pack(root: str | pathlib.Path) -> dict[str, Any]:
    """{"images", "identities", "property", "identity_records", "counts": {name: images}}."""
    rec, idx, property_path = pack_files(root)
    index = load_index(rec, idx, property_path)
    counts = np.bincount(index.labels, minlength=len(index.identity_labels))
    return {"images": int(len(index.labels)), "identities": int(len(counts)),
            "property": index.property, "identity_records": index.identity_records,
            "counts": dict(zip(index.identity_names, counts.tolist()))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facenet_jax.data.rec",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="an image folder root/<identity>/<image> "
                                  "→ an insightface pack")
    convert.add_argument("folder")
    convert.add_argument("pack_dir")
    convert.add_argument("--image_size", type=int, default=112)
    convert.add_argument("--quality", type=int, default=95, help="JPEG quality")
    convert.add_argument("--no_identity_records", action="store_true",
                         help="write images only (identities then come from image labels)")
    listing = commands.add_parser("list", help="a pack's identities and image counts")
    listing.add_argument("pack")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "convert":
        count = convert_folder(args.folder, args.pack_dir, image_size=args.image_size,
                               quality=args.quality, identity_records=not args.no_identity_records)
        print(f"wrote {count} images to {args.pack_dir}")
        return
    summary = describe_pack(args.pack)
    print(f"{summary['images']} images of {summary['identities']} identities; property "
          f"{summary['property']}; index from "
          f"{'identity records' if summary['identity_records'] else 'image labels'}")
    for name, count in summary["counts"].items():
        print(f"{name}\t{count}")


if __name__ == "__main__":
    from facenet_jax.cli import one_line_user_errors

    one_line_user_errors(main)(sys.argv[1:])
else:  # under `python -m`, the package's import of this module has registered it already
    DATA_SOURCES.add("rec", rec_as_configured)
