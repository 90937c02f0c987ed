"""Alignment geometry: the similarity fit against transforms built by hand, the warp against
hand-computed pixels, and landmark crops that put marked points on the reference points."""

import math

import numpy as np
import pytest

from facenet_jax.data import alignment


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (2.5, 0.3, -7.0, 12.0),
                                               (0.4, -2.9, 100.0, 3.5)])
def test_estimate_similarity_recovers_an_exact_transform(scale, angle, tx, ty):
    source = np.random.default_rng(0).uniform(0, 200, (5, 2))
    truth = _similarity(scale, angle, tx, ty)
    fitted = alignment.estimate_similarity(source, _apply(truth, source))
    np.testing.assert_allclose(fitted, truth, atol=1e-9)


def test_estimate_similarity_never_reflects():
    source = alignment.ARCFACE_REFERENCE_112
    mirrored = source * np.array([-1.0, 1.0])
    fitted = alignment.estimate_similarity(source, mirrored)
    assert np.linalg.det(fitted[:, :2]) > 0


def test_estimate_similarity_rejects_degenerate_points():
    with pytest.raises(ValueError, match="coincide"):
        alignment.estimate_similarity(np.ones((5, 2)), alignment.ARCFACE_REFERENCE_112)
    with pytest.raises(ValueError, match="finite"):
        alignment.estimate_similarity(np.full((5, 2), np.nan), alignment.ARCFACE_REFERENCE_112)
    with pytest.raises(ValueError, match="5 \\(x, y\\) landmarks"):
        alignment.align_by_landmarks(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))


def test_warp_identity_and_integer_shift():
    image = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        alignment.warp_affine(image, _similarity(1, 0, 0, 0), 20), image)
    shifted = alignment.warp_affine(image, _similarity(1, 0, 3, -2), 20)
    expected = np.zeros_like(image)
    expected[0:18, 3:20] = image[2:20, 0:17]  # crop (x, y) = source (x - 3, y + 2)
    np.testing.assert_array_equal(shifted, expected)


def test_warp_half_pixel_is_the_mean_of_neighbours():
    image = np.array([[0, 100], [50, 250]], np.uint8)
    # crop pixel (0, 0) samples the source at (0.5, 0.5): the mean of the four pixels.
    out = alignment.warp_affine(image, _similarity(1, 0, -0.5, -0.5), 1)
    assert out.shape == (1, 1) and out[0, 0] == 100


def test_align_by_landmarks_puts_marks_on_the_reference_points():
    truth = _similarity(2.2, 0.25, 40.0, 15.0)  # reference crop → photo
    photo_marks = _apply(truth, alignment.ARCFACE_REFERENCE_112)
    photo = np.zeros((400, 400), np.uint8)
    for x, y in np.rint(photo_marks).astype(int):
        photo[y - 2:y + 3, x - 2:x + 3] = 255
    crop = alignment.align_by_landmarks(photo, photo_marks, 112)
    for x, y in alignment.reference_landmarks(112):
        window = crop[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
        assert window.max() > 100, (x, y)
    # Away from the marks, the crop is dark.
    assert crop[5:25, 5:25].max() == 0


def test_reference_landmarks_scale_with_the_crop():
    np.testing.assert_allclose(alignment.reference_landmarks(224),
                               2 * alignment.ARCFACE_REFERENCE_112)
    with pytest.raises(ValueError):
        alignment.reference_landmarks(0)
