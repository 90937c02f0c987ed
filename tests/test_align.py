"""The alignment tool on real photos (../shared/data) and on canvases built from them.

The crop geometry is tested without a detector; detection needs the `mtcnn` package and
TensorFlow (`pip install '.[align]'`) and skips without them.
"""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from facenet_jax import align
from facenet_jax.data import alignment

LFW_PHOTOS = ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0002.jpg",
              "Adam_Sandler/Adam_Sandler_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0003.jpg")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def test_margin_box_is_davidsandbergs_rule():
    # margin 32 splits 16 / 16 around the box; clipped at the borders; truncated.
    np.testing.assert_array_equal(
        alignment.margin_box(np.array([50.7, 60.2, 120.9, 150.5]), 32, 200, 130),
        [34, 44, 130, 166])
    np.testing.assert_array_equal(
        alignment.margin_box(np.array([5.0, 3.0, 40.0, 50.0]), 44, 100, 100), [0, 0, 62, 72])


def test_align_by_box_crops_the_grown_box_and_resizes():
    image = np.zeros((100, 120, 3), np.uint8)
    image[30:70, 40:80] = 255  # the "face" fills the box exactly
    # Grown by 40 px in all: [20, 10, 100, 90], 80 px square; at size 80 it is that window.
    crop = alignment.align_by_box(image, np.array([40, 30, 80, 70]), image_size=80, margin=40)
    np.testing.assert_array_equal(crop, image[10:90, 20:100])
    # At size 40 each output pixel is a 2x2 block: the face's 40 px become 20, centred.
    small = alignment.align_by_box(image, np.array([40, 30, 80, 70]), image_size=40, margin=40)
    assert small.shape == (40, 40, 3)
    assert small[11:29, 11:29].min() == 255 and small[:9].max() == 0 and small[31:].max() == 0
    with pytest.raises(ValueError, match="nothing of the"):
        alignment.align_by_box(image, np.array([200, 200, 260, 260]), 80, 0)


def test_alignment_mismatch_warns_only_on_a_recorded_difference(tmp_path):
    assert alignment.alignment_mismatch("box", tmp_path) is None
    assert alignment.alignment_mismatch(None, tmp_path, 0.5) is None  # raw photos, unrecorded
    (tmp_path / alignment.ALIGNMENT_RECORD).write_text(json.dumps({"mode": "landmarks"}))
    assert alignment.alignment_mismatch("landmarks", tmp_path) is None
    assert "expects 'box' crops" in alignment.alignment_mismatch("box", tmp_path)


def test_a_run_without_alignment_expects_raw_photos_and_is_warned_of_aligned_crops(tmp_path):
    """An lfw.py run (no data.alignment, centre crop 0.5 of raw photos) on aligned crops: the
    0.5 crop is cut a second time; the warning says so (it stayed silent before)."""
    (tmp_path / alignment.ALIGNMENT_RECORD).write_text(json.dumps({"mode": "box"}))
    message = alignment.alignment_mismatch(None, tmp_path, 0.5)
    assert "holds 'box'-aligned crops" in message and "raw, unaligned photos" in message
    assert "data.center_crop=0.5 is cut from these crops a second time" in message
    whole = alignment.alignment_mismatch(None, tmp_path, None)
    assert "whole image" in whole and "second time" not in whole


def test_run_alignment_reads_the_key_then_the_training_folder_record(tmp_path):
    import ml_collections

    data = ml_collections.ConfigDict({"alignment": None, "source": "folder",
                                      "root": str(tmp_path), "center_crop": None})
    assert alignment.run_alignment(data) is None  # raw photos
    (tmp_path / alignment.ALIGNMENT_RECORD).write_text(json.dumps({"mode": "box"}))
    assert alignment.run_alignment(data) == "box"  # trained on aligned crops, key unset
    data.alignment = "landmarks"
    assert alignment.run_alignment(data) == "landmarks"
    data.alignment, data.source = None, "synthetic"
    assert alignment.run_alignment(data) is None


def test_choose_face_largest_or_central():
    small_centre = align.Face(np.array([45.0, 45, 55, 55]), 0.99, np.zeros((5, 2)))
    big_corner = align.Face(np.array([0.0, 0, 30, 30]), 0.95, np.zeros((5, 2)))
    assert align.choose_face([small_centre, big_corner], 100, 100) is big_corner
    assert align.choose_face([small_centre, big_corner], 100, 100, "central") is small_centre
    assert align.choose_face([], 100, 100) is None


@pytest.mark.parametrize("absent", align.DETECTOR_MODULES)
def test_detector_without_mtcnn_or_tensorflow_says_what_to_install(absent, monkeypatch):
    """mtcnn present without TensorFlow (it does not require it) is refused as clearly as no
    mtcnn, before any detection."""
    find_spec = align.importlib.util.find_spec
    monkeypatch.setattr(align.importlib.util, "find_spec",
                        lambda name, *a: None if name == absent else find_spec(name, *a))
    with pytest.raises(ImportError, match=rf"pip install 'facenet_jax\[align\]' \({absent} "):
        align.mtcnn_detector()


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("mtcnn", reason="mtcnn is not installed: pip install '.[align]'")
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install "
                        "'.[align]'")
    return align.mtcnn_detector()


@pytest.fixture(scope="module")
def photos(shared_data):
    return [align.read_rgb(shared_data / "lfw_half" / p) for p in LFW_PHOTOS] + [
        align.read_rgb(shared_data / "orl_faces" / f"s{i}" / "1.pgm") for i in (1, 2)]


@pytest.mark.slow
def test_detects_one_face_with_landmarks_inside_the_box_on_real_photos(detector, photos):
    for image in photos:
        face = align.choose_face(detector(image), *image.shape[:2])
        assert face is not None and face.score > 0.9
        x1, y1, x2, y2 = face.box
        assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
        assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))
        left_eye, right_eye, _, left_mouth, _ = face.landmarks
        assert left_eye[0] < right_eye[0] and left_eye[1] < left_mouth[1]


@pytest.mark.slow
@pytest.mark.parametrize("offset, scale", [((37, 81), 1.0), ((150, 20), 1.6), ((10, 200), 0.7)])
def test_box_on_a_canvas_maps_back_to_the_box_on_the_photo(detector, photos, offset, scale):
    image = photos[0]
    original = align.choose_face(detector(image), *image.shape[:2])
    h, w = image.shape[:2]
    pasted = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)),
                                                      Image.BILINEAR))
    canvas = np.full((640, 640, 3), 127, np.uint8)
    canvas[offset[1]:offset[1] + pasted.shape[0], offset[0]:offset[0] + pasted.shape[1]] = pasted
    found = align.choose_face(detector(canvas), 640, 640)
    assert found is not None
    back = (found.box - np.array([*offset, *offset])) / scale
    assert iou(back, original.box) >= 0.7


@pytest.mark.slow
def test_align_cli_writes_crops_report_and_resumes(detector, shared_data, tmp_path):
    src = tmp_path / "raw"
    for rel in LFW_PHOTOS[:2]:
        (src / pathlib.Path(rel).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "lfw_half" / rel, src / rel)
    (src / "Nobody").mkdir()
    Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(src / "Nobody" / "wall.png")
    (src / "Nobody" / "broken.jpg").write_bytes(b"not a jpeg")
    dst = tmp_path / "aligned"

    counts = align.align_folder(src, dst, mode="landmarks", image_size=112, workers=2,
                                detector=detector, progress=False)
    assert counts == {"aligned": 2, "no face": 1, "unreadable": 1}
    crop = np.asarray(Image.open(dst / "Abel_Pacheco" / "Abel_Pacheco_0001.png"))
    assert crop.shape == (112, 112, 3)
    assert json.loads((dst / "alignment.json").read_text())["mode"] == "landmarks"
    with (dst / align.REPORT_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [pathlib.Path(r["source"]).name for r in rows] == [
        "Abel_Pacheco_0001.jpg", "Abel_Pacheco_0002.jpg", "broken.jpg", "wall.png"]
    assert len(json.loads(rows[0]["landmarks"])) == 5 and float(rows[0]["score"]) > 0.9

    def fail(_):
        raise AssertionError("a resumed run must not detect again")

    assert align.align_folder(src, dst, mode="landmarks", image_size=112, detector=fail,
                              progress=False) == counts
    with pytest.raises(ValueError, match="was aligned with"):
        align.align_folder(src, dst, mode="box", image_size=160, detector=fail, progress=False)


def test_align_cli_exits_non_zero_when_nothing_aligns(tmp_path):
    src = tmp_path / "raw" / "someone"
    src.mkdir(parents=True)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, "-m", "facenet_jax.align", str(tmp_path / "raw"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "aligned 0 of 1 images" in result.stdout


def test_a_detection_that_gives_no_crop_is_no_face_not_a_crashed_run(tmp_path):
    src = tmp_path / "raw" / "someone"
    src.mkdir(parents=True)
    Image.fromarray(np.full((60, 60, 3), 90, np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((60, 60, 3), 90, np.uint8)).save(src / "b.png")
    landmarks = alignment.reference_landmarks(112) * 0.5

    def detect(image):  # a.png: a box beyond the image; b.png: a usable face
        off = float(image.shape[1]) + 50 if detect.calls == 0 else 5.0
        detect.calls += 1
        return [align.Face(box=np.array([off, 5.0, off + 40, 45.0]), score=0.99,
                           landmarks=landmarks)]

    detect.calls = 0
    counts = align.align_folder(tmp_path / "raw", tmp_path / "out", mode="box", workers=1,
                                detector=detect, progress=False)
    assert counts == {"aligned": 1, "no face": 1, "unreadable": 0}
    with (tmp_path / "out" / align.REPORT_FILE).open() as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["no face", "aligned"]
