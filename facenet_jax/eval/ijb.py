"""IJB-B / IJB-C 1:1 template verification, computed the way insightface's `eval_ijbc.py` does.

    python -m facenet_jax.evaluate --workdir DIR --ijb ROOT --ijb_name IJBC
        → DIR/eval_ijbc.json, DIR/eval_ijbc_roc.png

Layout (as distributed; IJB-B: the same files with `ijbb_`):

    ROOT/meta/ijbc_face_tid_mid.txt          image template_id media_id       (one per image)
    ROOT/meta/ijbc_name_5pts_score.txt       image x1 y1 ... x5 y5 detector_score
    ROOT/meta/ijbc_template_pair_label.txt   template_1 template_2 label(1 = same person)
    ROOT/loose_crop/<image>

The protocol: each image is aligned to 112 px by its 5 landmarks (`data.alignment`, the one
implementation), resized to the model's input size if that differs, embedded with its mirror
image added (flip); optionally weighted by its detector score; the images of one media (one
photo, or the frames of one video) are averaged, the media means of a template summed, and the
template feature L2-normalised; every template pair is scored by cosine similarity. TAR at
FAR = 1e-6 … 1e-1 is read off the ROC two ways: insightface's (the ROC point whose FAR is nearest
the target, which may lie above it) and the conservative one (the largest TAR whose FAR is at
most the target). insightface can also weight by the feature norm; our encoders output unit
vectors (and the flip sum is renormalised), so that variant does not apply: recorded as such.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from facenet_jax import runfiles
from facenet_jax.config import json_safe, provenance
from facenet_jax.data.alignment import align_by_landmarks
from facenet_jax.data.folder import resize_array
from facenet_jax.eval import metrics, plots

IJB_NAMES = ("IJBB", "IJBC")
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ALIGNED_SIZE = 112
FEATURE_NORM_NOTE = ("not applicable: the encoder outputs unit vectors and the flip sum is "
                     "renormalised, so no feature norm carries image quality")
ImageEmbedder = Callable[[np.ndarray], np.ndarray]  # uint8 [N,S,S,3] -> float [N,D]


@dataclasses.dataclass
class IJBMeta:
    """One IJB protocol: per image (N) names, template and media ids, landmarks [N,5,2] (x, y)
    and detector scores; per template pair (P) the two template ids [P,2] and is_same [P]."""

    image_names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    pair_templates: np.ndarray
    pair_is_same: np.ndarray


def meta_files(root: str | pathlib.Path, name: str) -> dict[str, pathlib.Path]:
    """The protocol's files under ROOT; FileNotFoundError naming every missing one (and what
    meta/ holds instead, which shows a misnamed file)."""
    if name not in IJB_NAMES:
        raise ValueError(f"unknown IJB set {name!r}; choose one of {', '.join(IJB_NAMES)}")
    root = pathlib.Path(root)
    prefix = name.lower()
    files = {"template_media": root / "meta" / f"{prefix}_face_tid_mid.txt",
             "landmarks": root / "meta" / f"{prefix}_name_5pts_score.txt",
             "pairs": root / "meta" / f"{prefix}_template_pair_label.txt",
             "images": root / "loose_crop"}
    missing = [str(path) for key, path in files.items()
               if not (path.is_dir() if key == "images" else path.is_file())]
    if missing:
        meta = root / "meta"
        held = sorted(p.name for p in meta.iterdir()) if meta.is_dir() else []
        raise FileNotFoundError(
            f"{name} layout incomplete under {root}: missing {', '.join(missing)}. meta/ holds "
            f"{held or 'nothing'}; the expected names are {prefix}_face_tid_mid.txt, "
            f"{prefix}_name_5pts_score.txt, {prefix}_template_pair_label.txt and a loose_crop/ "
            "folder of images (check --ijb_name and --ijb ROOT)")
    return files


def _rows(path: pathlib.Path, num_fields: int) -> list[list[str]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, row in enumerate(rows) if len(row) != num_fields), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 1} has {len(rows[bad])} fields, expected "
                         f"{num_fields}: {' '.join(rows[bad])!r}")
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def read_meta(root: str | pathlib.Path, name: str) -> IJBMeta:
    """Reads and cross-checks the three meta files (every image of the template list needs
    landmarks; every paired template needs images)."""
    files = meta_files(root, name)
    media_rows = _rows(files["template_media"], 3)
    image_names = [row[0] for row in media_rows]
    ids = np.array([row[1:] for row in media_rows], dtype=np.int64)
    landmark_of = {row[0]: row[1:] for row in _rows(files["landmarks"], 12)}
    missing = [n for n in image_names if n not in landmark_of]
    if missing:
        raise ValueError(f"{files['landmarks']}: no landmarks for {len(missing)} images of "
                         f"{files['template_media'].name}, e.g. {missing[:3]}")
    values = np.array([landmark_of[n] for n in image_names], dtype=np.float64)
    pairs = np.loadtxt(files["pairs"], dtype=np.int64, ndmin=2)
    if pairs.shape[1] != 3:
        raise ValueError(f"{files['pairs']}: expected 3 columns (template_1 template_2 label), "
                         f"got {pairs.shape[1]}")
    unknown = np.setdiff1d(pairs[:, :2], ids[:, 0])
    if len(unknown):
        raise ValueError(f"{files['pairs']}: {len(unknown)} templates have no image in "
                         f"{files['template_media'].name}, e.g. {unknown[:5].tolist()}")
    return IJBMeta(image_names=image_names, templates=ids[:, 0], medias=ids[:, 1],
                   landmarks=values[:, :10].reshape(-1, 5, 2), scores=values[:, 10],
                   pair_templates=pairs[:, :2], pair_is_same=pairs[:, 2] == 1)


def aligned_face(path: pathlib.Path, landmarks: np.ndarray, image_size: int) -> np.ndarray:
    """One loose crop aligned to 112 px by its landmarks [5,2], then resized to image_size:
    uint8 [S,S,3]. A file that cannot be read is an error naming it."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode IJB image {path}: {error}") from None
    face = align_by_landmarks(pixels, landmarks, ALIGNED_SIZE)
    return face if image_size == ALIGNED_SIZE else resize_array(face, image_size)


def _progress(iterable: Iterable, total: int, desc: str) -> Iterator:
    """A tqdm bar on a terminal; elsewhere (batch jobs) a log line every tenth of the work."""
    if total > 1 and sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(iterable, total=total, desc=desc)
        return
    every = max(1, total // 10)
    for done, item in enumerate(iterable, start=1):
        yield item
        if total > 1 and (done % every == 0 or done == total):
            logging.info("%s: %d/%d", desc, done, total)


def image_features(embed_images: ImageEmbedder, root: str | pathlib.Path, meta: IJBMeta, *,
                   image_size: int, chunk_size: int = 2048) -> np.ndarray:
    """Every image aligned and embedded, chunk by chunk (never all crops in memory):
    float32 [N, D]."""
    if image_size != ALIGNED_SIZE:
        logging.info("IJB: faces aligned at %d px are resized to %d px (the model's "
                     "data.image_size)", ALIGNED_SIZE, image_size)
    folder = pathlib.Path(root) / "loose_crop"
    starts = range(0, len(meta.image_names), chunk_size)
    features = []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in _progress(starts, len(starts), "IJB images (chunks)"):
            rows = range(start, min(start + chunk_size, len(meta.image_names)))
            faces = list(pool.map(lambda i: aligned_face(folder / meta.image_names[i],
                                                         meta.landmarks[i], image_size), rows))
            features.append(np.asarray(embed_images(np.stack(faces)), np.float32))
    return np.concatenate(features)


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """insightface's image → template pooling, vectorised.

    features [N,D], templates [N], medias [N] int, weights [N] (detector scores) or None →
    (template ids [T] ascending, unit template features [T,D] float64): each image weighted,
    the images of each (template, media) averaged, a template's media means summed, then
    L2-normalised.
    """
    x = np.asarray(features, np.float64)
    if weights is not None:
        x = x * np.asarray(weights, np.float64)[:, None]
    groups, group_of = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_means = _group_sums(x, group_of.ravel(), len(groups))
    media_means /= np.bincount(group_of.ravel(), minlength=len(groups))[:, None]
    template_ids, template_of = np.unique(groups[:, 0], return_inverse=True)
    pooled = _group_sums(media_means, template_of.ravel(), len(template_ids))
    return template_ids, metrics.l2_normalize_rows(pooled)


def _group_sums(x: np.ndarray, group_of: np.ndarray, num_groups: int) -> np.ndarray:
    """Row sums per group: x [N,D], group_of [N] in [0, G), every group non-empty → [G,D]
    (one stable sort and np.add.reduceat, far faster than np.add.at at IJB-C's 470k rows)."""
    order = np.argsort(group_of, kind="stable")
    starts = np.searchsorted(group_of[order], np.arange(num_groups))
    return np.add.reduceat(x[order], starts, axis=0)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray, *,
                chunk_size: int = 1_000_000) -> np.ndarray:
    """Cosine similarity of every template pair: ids [T] ascending, unit features [T,D],
    pairs [P,2] template ids → float64 [P], in chunks of pairs (memory O(chunk × D))."""
    index = np.searchsorted(template_ids, pairs)
    if np.any(index >= len(template_ids)) or np.any(template_ids[np.minimum(
            index, len(template_ids) - 1)] != pairs):
        raise ValueError("a template pair names a template without features")
    scores = np.empty(len(pairs))
    starts = range(0, len(pairs), chunk_size)
    for start in _progress(starts, len(starts), "template pairs (chunks)"):
        a, b = index[start:start + chunk_size, 0], index[start:start + chunk_size, 1]
        scores[start:start + chunk_size] = np.einsum("ij,ij->i", template_feats[a],
                                                     template_feats[b])
    return scores


def far_name(far: float) -> str:
    """1e-4 → "1e-4" (the JSON key of a FAR target)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def insightface_roc_points(far: np.ndarray, tar: np.ndarray, is_same: np.ndarray
                           ) -> np.ndarray:
    """Indices of the ROC points (far, tar [T], accept-nothing first, as metrics.roc_curve)
    that sklearn's `roc_curve(drop_intermediate=True)`, which eval_ijbc.py calls, returns:
    accept-nothing, then the points that are not collinear with their neighbours (second
    differences of the false/true accept counts not both 0), the first and last always kept.
    Reading the nearest FAR on these rather than on every point changes the TAR read when a
    dropped point was the nearest (a horizontal run's interior: the run's left corner's
    vertical neighbour is read instead)."""
    is_same = np.asarray(is_same, bool)
    false_accepts = np.rint(far[1:] * np.sum(~is_same))  # counts: exact second differences
    true_accepts = np.rint(tar[1:] * np.sum(is_same))
    if len(false_accepts) <= 2:
        return np.arange(len(far))
    corner = (np.diff(false_accepts, 2) != 0) | (np.diff(true_accepts, 2) != 0)
    return np.r_[0, 1 + np.flatnonzero(np.r_[True, corner, True])]


def tar_at_far(scores: np.ndarray, is_same: np.ndarray,
               far_targets: Sequence[float] = FAR_TARGETS) -> dict[str, Any]:
    """TAR at each FAR target from pair scores [P] (higher = more alike) and is_same [P].

    The ROC has one point per distinct score (accept pairs scoring ≥ it) plus accept-nothing.
    - "tar@far" (insightface's reading): the TAR of the point whose FAR is nearest the target,
      among the points sklearn's `roc_curve` keeps by default (`insightface_roc_points`); when
      several are equally near, the one with the highest TAR (eval_ijbc.py flips fpr and tpr
      before taking the first nearest); its FAR can exceed the target.
    - "tar@far_conservative": the point with the largest FAR not above the target (the largest
      TAR achievable within it), with its actual FAR and score threshold.
    Also "auc" and the ROC arrays far, tar (ascending FAR) for the figure.
    """
    # metrics.roc_curve accepts distance ≤ threshold: a negated score is such a distance.
    far, tar, thresholds = metrics.roc_curve(-np.asarray(scores, np.float64), is_same)
    kept = insightface_roc_points(far, tar, is_same)
    nearest, conservative = {}, {}
    for target in far_targets:
        gaps = np.abs(far[kept] - target)[::-1]  # reversed: the first minimum is the last point
        i = kept[len(kept) - 1 - int(np.argmin(gaps))]
        nearest[far_name(target)] = float(tar[i])
        j = int(np.searchsorted(far, target, side="right")) - 1  # far[0] = 0: j ≥ 0
        conservative[far_name(target)] = {"tar": float(tar[j]), "far": float(far[j]),
                                          "score_threshold": float(-thresholds[j])}
    return {"tar@far": nearest, "tar@far_conservative": conservative,
            "auc": float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0)),
            "far": far, "tar": tar}


def _thin_roc(far: np.ndarray, tar: np.ndarray, points: int = 4000
              ) -> tuple[np.ndarray, np.ndarray]:
    """A few thousand ROC points spread evenly in log FAR (millions do not plot), keeping the
    highest TAR at each kept FAR."""
    grid = np.logspace(-7, 0, points)
    keep = np.unique(np.clip(np.searchsorted(far, grid, side="right") - 1, 0, len(far) - 1))
    return far[keep], tar[keep]


def evaluate_ijb(embed_images: ImageEmbedder, root: str | pathlib.Path, name: str, *,
                 image_size: int, use_detector_score: bool = True,
                 meta: IJBMeta | None = None) -> dict[str, Any]:
    """The whole protocol on ROOT (see the module docstring) → result dict (ROC arrays
    included under "far"/"tar"). meta: ROOT's `read_meta`, when already read."""
    meta = meta or read_meta(root, name)
    logging.info("%s: %d images, %d templates, %d template pairs", name, len(meta.image_names),
                 len(np.unique(meta.templates)), len(meta.pair_templates))
    features = image_features(embed_images, root, meta, image_size=image_size)
    template_ids, feats = template_features(features, meta.templates, meta.medias,
                                            meta.scores if use_detector_score else None)
    scores = pair_scores(template_ids, feats, meta.pair_templates)
    result = tar_at_far(scores, meta.pair_is_same)
    result.update({
        "ijb_name": name, "root": str(pathlib.Path(root).resolve()),
        "num_images": len(meta.image_names), "num_templates": int(len(template_ids)),
        "num_pairs": int(len(scores)), "num_genuine_pairs": int(meta.pair_is_same.sum()),
        "features": {"alignment": f"5-point similarity to ArcFace's reference, {ALIGNED_SIZE} "
                                  f"px (data.alignment), then {image_size} px",
                     "detector_score_weighting": use_detector_score,
                     "media_pooling": "mean", "template_pooling": "sum of media means, "
                     "L2-normalised", "score": "cosine similarity",
                     "feature_norm_weighting": FEATURE_NORM_NOTE}})
    return result


def write_ijb(result: dict[str, Any], output: pathlib.Path) -> dict[str, Any]:
    """Writes the JSON (atomically, without the ROC arrays) and the log-FAR ROC figure
    `<stem>_roc.png` with the conservative TAR@FAR points marked."""
    output.parent.mkdir(parents=True, exist_ok=True)
    far, tar = _thin_roc(result.pop("far"), result.pop("tar"))
    points = {f"FAR ≤ {key}": (value["far"], value["tar"])
              for key, value in result["tar@far_conservative"].items() if value["far"] > 0}
    result["figures"] = {"roc": str(plots.plot_roc(
        far, tar, output.with_name(f"{output.stem}_roc.png"), label=result["ijb_name"],
        auc=result["auc"], log_far=True, far_min=min(FAR_TARGETS), points=points))}
    runfiles.atomic_write_json(output, json_safe(result))
    return result


def format_ijb_summary(result: dict[str, Any]) -> str:
    keys = list(result["tar@far"])
    head = " ".join(f"{k:>8}" for k in keys)
    return "\n".join([
        f"{result['ijb_name']} 1:1 ({result['num_pairs']} template pairs)   FAR {head}",
        "TAR (nearest point, insightface)  " + " ".join(
            f"{100 * result['tar@far'][k]:8.2f}" for k in keys),
        "TAR (FAR ≤ target, conservative)  " + " ".join(
            f"{100 * result['tar@far_conservative'][k]['tar']:8.2f}" for k in keys)])


def evaluate_workdir_ijb(workdir: str | pathlib.Path, root: str | pathlib.Path, name: str, *,
                         flip: bool = True, use_detector_score: bool = True,
                         output: pathlib.Path | None = None) -> dict[str, Any]:
    """The CLI's work: DIR's latest checkpoint on ROOT → DIR/eval_<name>.json + _roc.png."""
    from facenet_jax.eval.embed import load_encoder  # local: jax only where a model is loaded

    meta = read_meta(root, name)  # a bad layout or meta file fails before the model loads
    # Template features assume unit embeddings: the flip sum, whatever the run's eval.flip_mode.
    encoder = load_encoder(workdir, flip=flip, eval_overrides={"eval.flip_mode": "sum"})
    config = encoder.config
    result = evaluate_ijb(encoder.embed, root, name, image_size=config.data.image_size,
                          use_detector_score=use_detector_score, meta=meta)
    result["features"].update({"flip": flip, "flip_mode": "sum"})
    result.update({"step": encoder.step, "model": config.model.name,
                   "image_size": config.data.image_size, "provenance": provenance()})
    return write_ijb(result, output or output_path(workdir, name))


def output_path(workdir: str | pathlib.Path, name: str) -> pathlib.Path:
    """DIR/eval_ijbc.json (or eval_ijbb.json)."""
    return pathlib.Path(workdir) / f"eval_{name.lower()}.json"
