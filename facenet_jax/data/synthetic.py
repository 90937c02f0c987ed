"""Synthetic faces: the embedded default dataset (procedural, vectorised numpy, no download).

Each identity draws a fixed face (shape, jaw, skin and hair tone, hairline, eye spacing, size
and colour, brows, nose, mouth); each image adds nuisances that are strong in pixel space but
keep the identity: shift, scale, in-plane rotation, expression (smile, open mouth, raised
brows, blink), lighting direction and strength, overall gain, background colour and noise.
`difficulty` multiplies every nuisance range (0 = aligned, identical images per identity).
Identity i's face depends only on (seed, i); image j of identity i only on (seed, i, j).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import numpy as np

from facenet_jax.data.dataset import DATA_SOURCES, Dataset

_CHUNK = 512  # images rendered at once per thread: bounds the float32 working memory


@DATA_SOURCES.register("synthetic")
def synthetic_as_configured(data_config: Any) -> Dataset:
    """The synthetic faces `config.data.synthetic` describes, at `config.data.image_size`."""
    synthetic = data_config.synthetic
    return load_synthetic(synthetic.num_identities, synthetic.images_per_identity,
                          data_config.image_size, synthetic.difficulty,
                          seed=synthetic.get("seed", 0))


def load_synthetic(num_identities: int, images_per_identity: int, image_size: int = 32,
                   difficulty: float = 1.0, seed: int = 0) -> Dataset:
    """Returns num_identities × images_per_identity faces, uint8 [N,S,S,3], identity-major."""
    if num_identities < 1 or images_per_identity < 1:
        raise ValueError(f"synthetic data needs num_identities >= 1 and images_per_identity "
                         f">= 1, got {num_identities} and {images_per_identity}")
    if image_size < 8:
        raise ValueError(f"synthetic image_size={image_size} is too small to draw a face; "
                         "use at least 8 (32 is the default)")
    if not 0.0 <= difficulty <= 3.0:
        raise ValueError(f"synthetic difficulty={difficulty} must lie in [0, 3] (1 = default)")
    identities = identity_parameters(num_identities, seed)
    labels = np.repeat(np.arange(num_identities, dtype=np.int32), images_per_identity)
    images = np.empty((len(labels), image_size, image_size, 3), np.uint8)

    def render_rows(start: int) -> None:
        rows = np.arange(start, min(start + _CHUNK, len(labels)))
        ids, nth = labels[rows], rows % images_per_identity
        face = {k: v[ids] for k, v in identities.items()}
        nuisance = nuisance_parameters(ids, nth, difficulty, seed)
        images[rows] = _to_uint8(render_faces(face, nuisance, image_size))

    # numpy releases the GIL in its array loops: chunks render in parallel on every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(render_rows, range(0, len(labels), _CHUNK)))
    names = [f"synthetic_{i:05d}" for i in range(num_identities)]
    return Dataset(images=images, labels=labels, identity_names=names, paths=None)


def identity_parameters(num_identities: int, seed: int) -> dict[str, np.ndarray]:
    """Per-identity face parameters, each float32 [num_identities] (colours [n,3])."""
    # One row of draws per identity: identity i's face does not depend on how many are drawn.
    draws = np.random.default_rng([seed, 0x1D]).random((num_identities, 64)).astype(np.float32)
    columns = iter(range(64))

    def u(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * draws[:, next(columns)]

    tone = u(0.25, 0.95)
    skin = np.stack([tone, tone * u(0.7, 0.88), tone * u(0.5, 0.75)], -1)
    hair_tone = u(0.03, 0.85)
    hair = np.stack([hair_tone, hair_tone * u(0.6, 0.95), hair_tone * u(0.3, 0.8)], -1)
    iris_tone = u(0.05, 0.6)
    iris = np.stack([iris_tone * u(0.4, 1.0), iris_tone * u(0.6, 1.2), iris_tone * u(0.5, 1.6)],
                    -1)
    lips = np.stack([u(0.45, 0.85), u(0.15, 0.4), u(0.15, 0.4)], -1) * tone[:, None] ** 0.5
    return dict(
        face_w=u(0.52, 0.74), face_h=u(0.72, 0.92), jaw=u(0.0, 0.4),
        hairline=u(-0.62, -0.2), hair_volume=u(0.02, 0.22), hair_part=u(-0.5, 0.5),
        eye_x=u(0.17, 0.33), eye_y=u(-0.22, 0.02), eye_r=u(0.06, 0.12), eye_aspect=u(0.4, 0.8),
        brow_gap=u(0.07, 0.17), brow_thick=u(0.02, 0.06), brow_tilt=u(-0.35, 0.35),
        brow_len=u(0.08, 0.16),
        nose_len=u(0.14, 0.34), nose_w=u(0.04, 0.11), nose_dark=u(0.55, 0.9),
        mouth_y=u(0.34, 0.6), mouth_w=u(0.13, 0.3), lip_thick=u(0.022, 0.055),
        skin=skin.astype(np.float32), hair=hair.astype(np.float32),
        iris=np.clip(iris, 0, 1).astype(np.float32), lips=lips.astype(np.float32))


def nuisance_parameters(identity: np.ndarray, nth: np.ndarray, difficulty: float,
                        seed: int) -> dict[str, np.ndarray]:
    """Per-image nuisances for image `nth` of `identity` (int [n] each) → float32 [n] arrays
    (noise_seed: int64 [n]).

    Each image has its own random stream (seeded by seed, identity, nth), so an image does not
    depend on how many identities or images are generated alongside it.
    """
    d = np.float32(difficulty)
    draws = np.stack([np.random.default_rng([seed, 0x5A, int(i), int(j)]).random(16)
                      for i, j in zip(identity, nth)]).astype(np.float32)
    u = lambda col, lo, hi: lo + (hi - lo) * draws[:, col]  # noqa: E731
    sym = lambda col, half: (2 * draws[:, col] - 1) * half * d  # noqa: E731
    return dict(
        shift_x=sym(0, 0.14), shift_y=sym(1, 0.14),
        log_scale=sym(2, 0.1), angle=sym(3, np.deg2rad(12.0)),
        smile=sym(4, 0.8), mouth_open=u(5, 0, 1) * d, brow_raise=sym(6, 0.04),
        blink=np.clip(u(7, 0, 0.5) * d, 0, 0.9),
        light_azimuth=u(8, 0, 2 * np.pi), light_elevation=u(9, 0.15, 1.3),
        light_strength=np.clip(u(10, 0, 0.6) * d, 0, 0.95),
        gain=np.exp(sym(11, 0.25)),
        background=0.5 + sym(12, 0.35), background_hue=0.5 + sym(13, 0.35),
        noise_seed=(draws[:, 14] * 2**24).astype(np.int64), noise=u(15, 0.01, 0.035) * d)


def render_faces(face: dict[str, np.ndarray], nuisance: dict[str, np.ndarray],
                 size: int) -> np.ndarray:
    """Draws n faces: per-image parameter arrays [n] (colours [n,3]) → float32 [n,S,S,3]."""
    n = len(nuisance["angle"])
    col = lambda v: v.reshape(n, 1, 1)  # noqa: E731
    edge = np.float32(2.0 / size)  # a one-pixel soft edge, in face units
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(grid, grid, indexing="ij")
    # Inverse pose: image coordinates → face coordinates.
    u0, v0 = u[None] - col(nuisance["shift_x"]), v[None] - col(nuisance["shift_y"])
    inv_scale = col(np.exp(-nuisance["log_scale"]))
    cos, sin = col(np.cos(nuisance["angle"])), col(np.sin(nuisance["angle"]))
    x = (cos * u0 + sin * v0) * inv_scale
    y = (-sin * u0 + cos * v0) * inv_scale

    def inside(r: np.ndarray) -> np.ndarray:
        """Soft mask of r <= 1 where r is a normalised radius."""
        return np.clip((1 - r) / edge + 0.5, 0, 1)

    def ellipse(cx, cy, rx, ry) -> np.ndarray:
        return inside(np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))

    fw, fh = col(face["face_w"]), col(face["face_h"])
    # The jaw narrows the face towards the chin.
    width = fw * (1 - col(face["jaw"]) * np.clip(y / fh, 0, 1) ** 2)
    face_mask = inside(np.sqrt((x / width) ** 2 + (y / fh) ** 2))
    hair_mask = ellipse(0, -col(face["hair_volume"]) * 0.5, fw + col(face["hair_volume"]),
                        fh + col(face["hair_volume"])) * (y < col(face["eye_y"]) - 0.05)
    hairline = col(face["hairline"]) + 0.12 * np.abs(x - col(face["hair_part"]) * fw) / fw
    on_forehead_hair = np.clip((hairline - y) / edge + 0.5, 0, 1)

    # Lighting on an ellipsoid face: Lambertian shading of its surface normal.
    nx, ny = x / fw, y / fh
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0.02, 1))
    az, el = col(nuisance["light_azimuth"]), col(nuisance["light_elevation"])
    lambert = np.clip(np.cos(az) * np.cos(el) * nx + np.sin(az) * np.cos(el) * ny
                      + np.sin(el) * nz, 0, 1)
    strength = col(nuisance["light_strength"])
    shading = (1 - strength) + strength * 1.6 * lambert

    hue = nuisance["background_hue"][:, None]
    background = (0.15 + 0.7 * nuisance["background"][:, None]) * np.concatenate(
        [0.8 + 0.4 * hue, np.full_like(hue, 1.0), 1.2 - 0.4 * hue], -1)
    white = np.full((n, 3), 0.92, np.float32)
    layers = [(hair_mask, face["hair"]), (face_mask, face["skin"]),
              (face_mask * on_forehead_hair, face["hair"])]
    darkening = []  # single-channel multiplicative shadows

    # Eyes: white, then the iris; blinking squashes them.
    ex, ey, er = col(face["eye_x"]), col(face["eye_y"]), col(face["eye_r"])
    eye_h = er * col(face["eye_aspect"]) * (1 - col(nuisance["blink"]))
    for side in (-1, 1):
        eye_white = ellipse(side * ex, ey, er, eye_h + 1e-3)
        layers.append((eye_white, white))
        layers.append((eye_white * ellipse(side * ex, ey, er * 0.55, er * 0.55), face["iris"]))
        # Brows: a tilted bar above each eye, raised by expression.
        by = ey - col(face["brow_gap"]) - er * 0.5 - col(nuisance["brow_raise"])
        bx = x - side * ex
        tilt = by + side * col(face["brow_tilt"]) * bx
        layers.append((inside(np.sqrt((bx / col(face["brow_len"])) ** 2
                                      + ((y - tilt) / col(face["brow_thick"])) ** 2)),
                       face["hair"] * 0.8))

    # Nose: a darker ridge shadow from the eye line down, and two nostrils.
    nose_top, nose_len, nose_w = ey + 0.05, col(face["nose_len"]), col(face["nose_w"])
    along = np.clip((y - nose_top) / nose_len, 0, 1)
    ridge = inside(np.abs(x) / (nose_w * (0.3 + 0.7 * along) + 1e-3)) * \
        ((y > nose_top) & (y < nose_top + nose_len))
    darkening.append(1 - ridge * (1 - col(face["nose_dark"])) * 0.6)
    for side in (-1, 1):
        nostril = ellipse(side * nose_w * 0.6, nose_top + nose_len, nose_w * 0.35, nose_w * 0.2)
        darkening.append(1 - nostril * 0.5)

    # Mouth: a lip band along a parabola (smile), opening into a dark gap.
    mw, my = col(face["mouth_w"]), col(face["mouth_y"])
    t = np.clip(x / mw, -1.5, 1.5)
    centre = my - col(nuisance["smile"]) * 0.06 * (1 - t ** 2)
    opening = col(nuisance["mouth_open"]) * 0.05
    layers.append((inside(np.sqrt(t ** 2 + ((y - centre) / (col(face["lip_thick"]) + opening))
                                  ** 2)), face["lips"]))
    gap = inside(np.sqrt(t ** 2 * 1.2 + ((y - centre) / (opening * 0.8 + 1e-3)) ** 2))
    layers.append((gap * (opening > 0.004), np.full((n, 3), 0.08, np.float32)))

    # Light the head (skin and hair), then exposure; compose in one batched matmul.
    head = np.maximum(face_mask, hair_mask)
    darkening.append(1 + head * (shading - 1))
    img = _composite(layers, background) * (np.prod(darkening, axis=0)
                                            * col(nuisance["gain"]))[..., None]
    noise = np.stack([np.random.default_rng(int(s)).standard_normal((size, size, 3), np.float32)
                      for s in nuisance["noise_seed"]])  # per image: independent of the chunk
    img += noise * col(nuisance["noise"])[..., None]
    return img


def _composite(layers: list[tuple[np.ndarray, np.ndarray]], background: np.ndarray
               ) -> np.ndarray:
    """Paints layers (mask [n,S,S] in [0,1], colour [n,3]) in order over a background [n,3].

    Over-painting is linear in the colours: each layer's weight is its mask times the
    transparency of every later layer, so the RGB image is one [n,3,L]×[n,L,S²] matmul.
    """
    n, size = layers[0][0].shape[:2]
    weights = np.empty((n, len(layers) + 1, size, size), np.float32)
    remaining = np.ones((n, size, size), np.float32)
    for i in range(len(layers) - 1, -1, -1):
        mask = layers[i][0]
        np.multiply(mask, remaining, out=weights[:, i + 1])
        remaining *= 1 - mask
    weights[:, 0] = remaining
    colors = np.stack([background] + [c for _, c in layers], axis=2).astype(np.float32)
    rgb = np.matmul(colors, weights.reshape(n, len(layers) + 1, size * size))
    return rgb.reshape(n, 3, size, size).transpose(0, 2, 3, 1)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
