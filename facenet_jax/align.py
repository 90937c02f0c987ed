"""Face alignment of raw photos: detect, keep one face per image, write aligned crops.

    python -m facenet_jax.align SRC DST --mode box --image_size 160 --margin 32
    python -m facenet_jax.align SRC DST --mode landmarks --image_size 112

SRC/<identity>/<image> → DST/<identity>/<image stem>.png. `--mode box` is FaceNet's crop
(davidsandberg's align_dataset_mtcnn: the MTCNN box grown by `margin` source pixels, then
resized); `--mode landmarks` is ArcFace's (the similarity taking the 5 MTCNN landmarks onto the
reference points, `data.alignment.align_by_landmarks`). DST/alignment.json records the mode and
size; DST/align_report.csv has one row per source image (status aligned / no face /
unreadable, box, landmarks, score). Re-running skips images already aligned (resumable); one
bad image never stops the run; the exit status is non-zero when nothing could be aligned.

The detector is the `mtcnn` package (1.0; its three networks' weights ship inside the wheel,
nothing downloads) on TensorFlow: `pip install 'facenet_jax[align]'` brings both. Imported only
here.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import logging
import pathlib
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from facenet_jax.data.alignment import (ALIGNMENT_MODES, ALIGNMENT_RECORD, align_by_box,
                                        align_by_landmarks)
from facenet_jax.runfiles import atomic_write_bytes, atomic_write_text

REPORT_FILE = "align_report.csv"
REPORT_FIELDS = ("source", "output", "status", "x1", "y1", "x2", "y2", "score", "landmarks")
STATUSES = ("aligned", "no face", "unreadable")
FACE_RULES = ("largest", "central")
MTCNN_HINT = ("face detection needs the mtcnn package and TensorFlow: pip install "
              "'facenet_jax[align]'")
# mtcnn imports TensorFlow without requiring it, so both are checked before any work.
DETECTOR_MODULES = ("mtcnn", "tensorflow")


@dataclasses.dataclass(frozen=True)
class Face:
    """One detection in source-image pixels: box (x1, y1, x2, y2), score, landmarks [5, 2]
    (x, y: left eye, right eye, nose, left and right mouth corner, as the image shows them)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


Detector = Callable[[np.ndarray], list[Face]]


def mtcnn_detector() -> Detector:
    """detect(uint8 RGB [H, W, 3]) -> faces, with the mtcnn package's MTCNN (thread-safe use:
    one TensorFlow graph, calls serialised by a lock; decoding and warping run in parallel)."""
    missing = [name for name in DETECTOR_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{MTCNN_HINT} ({', '.join(missing)} not found)")
    lock = threading.Lock()
    # Built at the first detection: a run of only unreadable files never starts TensorFlow.
    network: list[Any] = []

    def detect(image: np.ndarray) -> list[Face]:
        with lock:
            if not network:
                from mtcnn import MTCNN
                network.append(MTCNN())
            rows = network[0].detect_faces(image, output_type="numpy", box_format="xyxy")
        # Rows: [image index, x1, y1, x2, y2, score, x of the 5 points, y of the 5 points].
        return [Face(box=np.asarray(row[1:5], np.float64), score=float(row[5]),
                     landmarks=np.stack([row[6:11], row[11:16]], axis=1).astype(np.float64))
                for row in np.asarray(rows).reshape(-1, 16)]

    return detect


def choose_face(faces: Sequence[Face], height: int, width: int, rule: str = "largest"
                ) -> Face | None:
    """The face to keep: the largest box, or the one whose centre is nearest the image's."""
    if not faces:
        return None
    if rule == "largest":
        return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    centre = np.array([width / 2, height / 2])
    return min(faces, key=lambda f: float(np.sum(((f.box[:2] + f.box[2:]) / 2 - centre) ** 2)))


def crop(image: np.ndarray, face: Face, *, mode: str, image_size: int, margin: float
         ) -> np.ndarray:
    """The aligned crop of `face` in `image` (uint8 [H, W, 3]) → uint8 [S, S, 3]."""
    if mode == "box":
        return align_by_box(image, face.box, image_size, margin)
    return align_by_landmarks(image, face.landmarks, image_size)


def read_rgb(path: pathlib.Path) -> np.ndarray:
    """uint8 [H, W, 3]; grey and palette images become RGB (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def align_one(source: pathlib.Path, output: pathlib.Path, detect: Detector, *, mode: str,
              image_size: int, margin: float, face_rule: str) -> dict[str, Any]:
    """Aligns one photo and writes its crop; returns its report row (never raises for a bad
    image: an unreadable file or a photo without a face is a status)."""
    from PIL import Image

    row: dict[str, Any] = {"source": str(source), "output": "", "status": "unreadable"}
    try:
        image = read_rgb(source)
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a broken file
        logging.warning("unreadable %s: %s", source, error)
        return row
    face = choose_face(detect(image), *image.shape[:2], rule=face_rule)
    if face is None:
        return {**row, "status": "no face"}
    try:
        aligned = crop(image, face, mode=mode, image_size=image_size, margin=margin)
    except ValueError as error:  # a box off the image or collapsed landmarks: no usable face
        logging.warning("no usable face in %s: %s", source, error)
        return {**row, "status": "no face"}
    output.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(aligned).save(png, format="PNG")
    atomic_write_bytes(output, png.getvalue())  # a killed run never leaves a torn crop
    x1, y1, x2, y2 = (round(float(v), 2) for v in face.box)
    return {**row, "output": str(output), "status": "aligned", "x1": x1, "y1": y1, "x2": x2,
            "y2": y2, "score": round(face.score, 5),
            "landmarks": json.dumps(np.round(face.landmarks, 2).tolist())}


def _settings_record(mode: str, image_size: int, margin: float, face_rule: str
                     ) -> dict[str, Any]:
    record = {"mode": mode, "image_size": image_size, "face": face_rule,
              "detector": f"mtcnn {_version('mtcnn')}"}
    if mode == "box":
        record["margin"] = margin
    return record


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_settings(dst: pathlib.Path, record: dict[str, Any]) -> None:
    """A DST aligned with other settings would mix two kinds of crop: refuse, naming both."""
    path = dst / ALIGNMENT_RECORD
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    keys = ("mode", "image_size", "margin", "face")
    if any(saved.get(k) != record.get(k) for k in keys):
        raise ValueError(
            f"{dst} was aligned with {({k: saved.get(k) for k in keys})}, not "
            f"{({k: record.get(k) for k in keys})}; use another DST or the same settings")


def _read_report(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["source"]: row for row in csv.DictReader(handle)}


def align_folder(src: str | pathlib.Path, dst: str | pathlib.Path, *, mode: str = "box",
                 image_size: int = 160, margin: float = 32, face_rule: str = "largest",
                 workers: int = 4, detector: Detector | None = None,
                 progress: bool = True) -> dict[str, int]:
    """Aligns SRC/<identity>/<image> into DST (see the module docstring); returns the count of
    each status over all source images (those done in an earlier run included)."""
    from facenet_jax.data.folder import scan_folder

    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"unknown --mode {mode!r}; valid: {', '.join(ALIGNMENT_MODES)}")
    if face_rule not in FACE_RULES:
        raise ValueError(f"unknown --face {face_rule!r}; valid: {', '.join(FACE_RULES)}")
    if image_size < 16 or margin < 0 or workers < 1:
        raise ValueError(f"need image_size >= 16, margin >= 0 and workers >= 1, got "
                         f"{image_size}, {margin}, {workers}")
    src, dst = pathlib.Path(src).resolve(), pathlib.Path(dst).resolve()
    # A missing or empty SRC fails here, naming the layout.
    relative, _ = scan_folder(src, role="source folder (SRC)", fix="give as SRC")
    record = _settings_record(mode, image_size, margin, face_rule)
    dst.mkdir(parents=True, exist_ok=True)
    _check_settings(dst, record)
    (dst / ALIGNMENT_RECORD).write_text(json.dumps(record, indent=2))

    report_path = dst / REPORT_FILE
    rows = _read_report(report_path)
    outputs = {rel: dst / pathlib.Path(rel).with_suffix(".png") for rel in relative}
    # Done before: aligned with its crop on disk, or a final verdict on an unchanged source.
    todo = [rel for rel in relative
            if not (str(src / rel) in rows and (rows[str(src / rel)]["status"] != "aligned"
                                                or outputs[rel].is_file()))]
    logging.info("%d of %d images to align (%d done before)", len(todo), len(relative),
                 len(relative) - len(todo))
    detect = detector if detector is not None else mtcnn_detector()

    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="img", desc="aligning", disable=not sys.stderr.isatty())
    with report_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_FIELDS)
        if handle.tell() == 0:
            writer.writeheader()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(align_one, src / rel, outputs[rel], detect, mode=mode,
                                   image_size=image_size, margin=margin, face_rule=face_rule)
                       for rel in todo]
            for future in concurrent.futures.as_completed(futures):
                row = future.result()
                writer.writerow(row)
                handle.flush()  # a killed run keeps every verdict it reached
                rows[row["source"]] = row
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    _rewrite_report(report_path, [rows[str(src / rel)] for rel in relative])
    counts = {status: 0 for status in STATUSES}
    for rel in relative:
        counts[rows[str(src / rel)]["status"]] += 1
    return counts


def _rewrite_report(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """The report in source order, one row per source image (atomically replaced)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=REPORT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def main(argv: list[str]) -> None:
    from absl import flags

    from facenet_jax.cli import cli_logging

    cli_logging()
    if len(argv) != 3:
        raise ValueError("usage: python -m facenet_jax.align SRC DST [--mode box|landmarks] "
                         "[--image_size S] [--margin M] [--face largest|central] [--workers N]")
    flags_ = flags.FLAGS
    counts = align_folder(argv[1], argv[2], mode=flags_.mode,
                          image_size=flags_.image_size or (160 if flags_.mode == "box" else 112),
                          margin=flags_.margin, face_rule=flags_.face, workers=flags_.workers)
    total = sum(counts.values())
    print(f"aligned {counts['aligned']} of {total} images ({counts['no face']} without a face, "
          f"{counts['unreadable']} unreadable); report: {pathlib.Path(argv[2]) / REPORT_FILE}")
    if counts["aligned"] == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    from absl import flags

    from facenet_jax import cli

    flags.DEFINE_enum("mode", "box", list(ALIGNMENT_MODES),
                      "box: FaceNet's margin crop; landmarks: ArcFace's 5-point alignment")
    flags.DEFINE_integer("image_size", None, "crop size (default 160 for box, 112 for "
                         "landmarks)")
    flags.DEFINE_float("margin", 32, "box mode: margin in source pixels, split around the box")
    flags.DEFINE_enum("face", "largest", list(FACE_RULES), "which face of a photo to keep")
    flags.DEFINE_integer("workers", 4, "threads decoding, cropping and writing images")
    cli.run(main)
