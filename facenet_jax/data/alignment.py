"""Face alignment geometry (numpy): the 5-point similarity transform onto ArcFace's reference
points and the warp that cuts the aligned crop.

One implementation for every caller that aligns by landmarks (the alignment tool on raw photos,
the IJB evaluators on their given landmarks), so a model sees the same crops in training and in
evaluation. Coordinates follow the image-index convention the landmark files use (OpenCV's):
pixel (x, y) is the centre of column x, row y.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

# ArcFace's reference landmarks in a 112×112 crop: left eye, right eye, nose tip, left and right
# mouth corners (x, y). Deng et al. 2019; insightface's `arcface_dst`.
ARCFACE_REFERENCE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def reference_landmarks(image_size: int = 112) -> np.ndarray:
    """ArcFace's reference points scaled to an S×S crop: float64 [5, 2] (x, y)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return ARCFACE_REFERENCE_112 * (image_size / 112.0)


def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    `source` points onto `target` points (Umeyama 1991).

    source, target: [N, 2] (x, y), N ≥ 2 → float64 [2, 3] matrix M with target ≈ M @ [x, y, 1].
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2:
        raise ValueError(f"need two [N, 2] point sets of one shape, got {source.shape} and "
                         f"{target.shape}")
    if source.shape[0] < 2 or not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise ValueError("need at least 2 finite points to estimate a similarity transform")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    source_variance = (source_centred ** 2).sum() / len(source)
    if source_variance <= 0:
        raise ValueError("the source landmarks coincide: no transform is defined")
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    # A reflection would fit mirrored landmarks better but flip the face: forbid it.
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / source_variance)
    translation = target_mean - scale * rotation @ source_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
    """Cut an S×S crop: output pixel p takes the bilinear sample of `image` at M⁻¹ p; samples
    outside the image are 0 (OpenCV's `warpAffine` with a constant border).

    image: uint8 [H, W] or [H, W, C]; matrix: [2, 3] (source → crop) → uint8 [S, S(, C)].
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(forward)) < 1e-12:
        raise ValueError("the alignment transform is singular (landmarks collapsed)")
    inverse = np.linalg.inv(forward)[:2]
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width = pixels.shape[:2]
    x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    out = np.zeros((image_size, image_size, pixels.shape[2]), np.float64)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = ((xi >= 0) & (xi < width) & (yi >= 0) & (yi < height))[..., None]
            sample = pixels[np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
            out += np.where(inside, sample, 0.0) * wx * wy
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out


def align_by_landmarks(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112
                       ) -> np.ndarray:
    """ArcFace-style crop: the similarity taking the 5 landmarks (float [5, 2], x, y, in the
    order of `ARCFACE_REFERENCE_112`) onto the reference points, applied to `image`
    (uint8 [H, W(, C)]) → uint8 [S, S(, C)]."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need 5 (x, y) landmarks, got {landmarks.shape[0]}")
    matrix = estimate_similarity(landmarks, reference_landmarks(image_size))
    return warp_affine(image, matrix, image_size)


# What `python -m facenet_jax.align` records in DST/alignment.json, and what
# `config.data.alignment` names: the kind of crop a model was trained on and expects.
ALIGNMENT_MODES = ("box", "landmarks")
ALIGNMENT_RECORD = "alignment.json"


def margin_box(box: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
    """davidsandberg/facenet's crop rule (align_dataset_mtcnn): the detected box (x1, y1, x2,
    y2) grown by `margin` source pixels in all, split equally around it, clipped to the image
    and truncated to whole pixels → int64 [4] (x1, y1, x2, y2), x2/y2 exclusive.

    (facenet-pytorch's `margin` is in pixels of the *resized* crop: another rule.)
    """
    box = np.asarray(box, dtype=np.float64)
    grown = np.array([max(box[0] - margin / 2, 0), max(box[1] - margin / 2, 0),
                      min(box[2] + margin / 2, width), min(box[3] + margin / 2, height)])
    return grown.astype(np.int64)  # truncation, as np.int32 there


def align_by_box(image: np.ndarray, box: np.ndarray, image_size: int = 160,
                 margin: float = 32) -> np.ndarray:
    """FaceNet-style crop: `margin_box` of the detected box, resized bilinearly to S×S.

    image: uint8 [H, W, C]; box: (x1, y1, x2, y2) in source pixels → uint8 [S, S, C].
    Raises ValueError when the box lies outside the image (nothing to crop).
    """
    from PIL import Image  # local: the geometry above stays numpy-only

    height, width = image.shape[:2]
    x1, y1, x2, y2 = margin_box(box, margin, height, width)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"the box {np.round(box, 1).tolist()} leaves nothing of the "
                         f"{width}x{height} image to crop")
    crop = Image.fromarray(image[y1:y2, x1:x2])
    return np.asarray(crop.resize((image_size, image_size), Image.BILINEAR))


def read_alignment_record(folder: str | pathlib.Path) -> dict | None:
    """DST/alignment.json written by the alignment tool, or None for a folder without one."""
    path = pathlib.Path(folder) / ALIGNMENT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def run_alignment(data_config: Any) -> str | None:
    """The crops a run's encoder expects: `data.alignment`; else the mode its training folder
    records (DATA_ROOT/alignment.json); else None: raw photos, of which it keeps the central
    `data.center_crop` (or all)."""
    if data_config.get("alignment"):
        return data_config.alignment
    root = data_config.get("root") if data_config.get("source") == "folder" else None
    record = read_alignment_record(root) if root else None
    return record.get("mode") if record else None


def describe_expected(expected: str | None, center_crop: float | None) -> str:
    """"'box' crops" or, for a run without alignment, the raw photos it cuts its centre crop
    from."""
    if expected is not None:
        return f"{expected!r} crops"
    kept = (f"the central square of {center_crop:g} × the shorter side (data.center_crop)"
            if center_crop is not None else "the whole image (no data.center_crop)")
    return f"raw, unaligned photos of which it keeps {kept}: data.alignment is not set"


def crops_mismatch(expected: str | None, record: dict | None, source: str,
                   center_crop: float | None = None) -> str | None:
    """A warning text when crops recorded as `record` ({"mode": ...}; None: unknown) differ from
    what a model expects (`expected`: its alignment, None for raw photos, see
    `run_alignment`), else None."""
    mode = None if record is None else record.get("mode")
    if record is not None and mode == expected:
        return None
    wanted = describe_expected(expected, center_crop)
    if record is None:
        return (f"{source} records no alignment: whether its crops match the model's "
                f"({wanted}) is unknown")
    second_crop = (f"; its data.center_crop={center_crop:g} is cut from these crops a second "
                   "time" if expected is None and center_crop not in (None, 1.0) else "")
    fix = (f"re-align the raw photos with python -m facenet_jax.align --mode {expected}"
           if expected is not None else "evaluate it on raw photos like its training data")
    return (f"{source} holds {mode!r}-aligned crops but the model expects {wanted}"
            f"{second_crop}; embeddings of another alignment lose accuracy: {fix}")


def alignment_mismatch(expected: str | None, folder: str | pathlib.Path,
                       center_crop: float | None = None) -> str | None:
    """A warning text when `folder`'s recorded alignment differs from the crops a model expects
    (`run_alignment`: None means raw photos cut by `center_crop`), else None (also when the
    folder records none: nothing to compare)."""
    record = read_alignment_record(folder)
    return None if record is None else crops_mismatch(expected, record, str(folder),
                                                      center_crop)
