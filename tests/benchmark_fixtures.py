"""Benchmark files in the field's formats, built from synthetic faces at test time: insightface
`.bin` verification sets (including the stream Python 2 wrote) and an IJB-C layout."""

import io
import itertools
import struct

import numpy as np
from PIL import Image

from facenet_jax.data import load_synthetic
from facenet_jax.data.alignment import reference_landmarks, warp_affine


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def python2_pickle(images: list[bytes], flags: list[bool]) -> bytes:
    """The stream Python 2's cPickle.dump((images, flags), f, protocol=2) writes: str as
    SHORT_BINSTRING (< 256 bytes) or BINSTRING, lists as EMPTY_LIST + MARK ... APPENDS, the
    tuple as TUPLE2 (assembled opcode by opcode; Python 3 cannot write these string opcodes)."""
    out = [b"\x80\x02", b"]q\x00("]  # PROTO 2; EMPTY_LIST, BINPUT 0, MARK
    for memo, image in enumerate(images, start=1):
        out.append(b"U" + bytes([len(image)]) if len(image) < 256
                   else b"T" + struct.pack("<i", len(image)))
        out.append(image + b"r" + struct.pack("<I", memo))  # LONG_BINPUT, as cPickle memoises
    out.append(b"e]q\x00(")  # APPENDS; EMPTY_LIST, BINPUT, MARK
    out.extend(b"\x88" if flag else b"\x89" for flag in flags)  # NEWTRUE / NEWFALSE
    out.append(b"e\x86q\x01.")  # APPENDS, TUPLE2, BINPUT, STOP
    return b"".join(out)


def synthetic_pairs(num_pairs=40, size=32, seed=0):
    """Pairs of synthetic faces: pair i is same when i is even; folds mix both kinds."""
    faces = load_synthetic(12, 8, size, 1.0, seed=seed)
    rng = np.random.default_rng(seed)
    rows, flags = [], []
    for i in range(num_pairs):
        a = int(rng.integers(len(faces.labels)))
        same = i % 2 == 0
        candidates = np.flatnonzero((faces.labels == faces.labels[a]) == same)
        candidates = candidates[candidates != a]
        rows += [a, int(rng.choice(candidates))]
        flags.append(same)
    return faces.images[rows], flags



FACE, LOOSE, MODEL = 32, 64, 16
MEDIA_SIZES = (3, 2, 1, 2)  # images per media within each template of 8 images


def _placement(rng):
    """A random similarity [2,3] putting a FACE-px face inside a LOOSE-px loose crop."""
    angle, scale = rng.uniform(-0.35, 0.35), rng.uniform(1.1, 1.5)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)],
                                 [np.sin(angle), np.cos(angle)]])
    centre = LOOSE / 2 + rng.uniform(-4, 4, 2)
    return np.concatenate([rotation, (centre - rotation @ [FACE / 2, FACE / 2])[:, None]], 1)


def write_ijb_layout(root):
    """An IJB-C layout under root from synthetic faces: 12 identities × 16 images (192) → 24
    templates of 4 media each, every template pair; each face placed in a LOOSE-px loose crop by
    a random similarity, its 5 landmarks the reference points moved by it. Returns (root, faces,
    (name, template, media) rows, landmarks [N,5,2], detector scores [N], pairs [(t1, t2, label)]),
    values rounded as written."""
    (root / "meta").mkdir()
    (root / "loose_crop").mkdir()
    faces = load_synthetic(12, 16, FACE, 1.0, seed=3)
    rng = np.random.default_rng(0)
    names, landmarks, media_rows = [], [], []
    for i, (face, label) in enumerate(zip(faces.images, faces.labels)):
        placement = _placement(rng)
        name = f"{i + 1}.png"
        Image.fromarray(warp_affine(face, placement, LOOSE)).save(root / "loose_crop" / name)
        points = reference_landmarks(FACE) @ placement[:, :2].T + placement[:, 2]
        names.append(name)
        landmarks.append(points)
        position = i % 16
        template = 2 * int(label) + 1 + position // 8
        within = position % 8
        media_of = np.repeat(np.arange(len(MEDIA_SIZES)), MEDIA_SIZES)[within]
        media_rows.append((name, template, 100 * template + int(media_of)))
    scores = rng.uniform(0.5, 1.0, len(names))
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in media_rows))
    order = rng.permutation(len(names))  # the landmark file in another order: matched by name
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{names[i]} {' '.join(f'{v:.4f}' for v in landmarks[i].ravel())} {scores[i]:.4f}\n"
        for i in order))
    templates = sorted({t for _, t, _ in media_rows})
    pairs = [(a, b, int((a - 1) // 2 == (b - 1) // 2))
             for a, b in itertools.combinations(templates, 2)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {label}\n" for a, b, label in pairs))
    return root, faces, media_rows, np.round(np.array(landmarks), 4), np.round(scores, 4), pairs
