"""The seed's augmentations as TensorFlow ops: shapes, ranges, probabilities, the affine warp."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.toolkit.augment import AugmentSpec, _shift_scale_rotate, augment

OFF = AugmentSpec(p_flip=0, p_brightness_contrast=0, p_gamma=0, p_affine=0)


@pytest.fixture(scope="module")
def image(tf):
    rng = np.random.default_rng(0)
    return tf.constant(rng.uniform(0, 255, (48, 64, 3)).astype("float32"))


def test_all_off_is_identity(image):
    np.testing.assert_array_equal(augment(image, OFF).numpy(), image.numpy())


def test_flip_always(tf, image):
    spec = AugmentSpec(p_flip=1.0, p_brightness_contrast=0, p_gamma=0, p_affine=0)
    np.testing.assert_array_equal(augment(image, spec).numpy(), image.numpy()[::-1, ::-1])


def test_photometric_stays_in_range(tf, image):
    spec = AugmentSpec(p_flip=0, p_brightness_contrast=1.0, p_gamma=1.0, p_affine=1.0)
    for _ in range(10):
        out = augment(image, spec).numpy()
        assert out.shape == (48, 64, 3) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3


def test_affine_with_zero_ranges_is_identity(tf, image):
    spec = AugmentSpec(shift=0.0, scale=0.0, rotate_deg=0.0)
    np.testing.assert_allclose(_shift_scale_rotate(image, spec).numpy(), image.numpy(), atol=1e-3)


def test_affine_shift_moves_content(tf):
    """A pure shift moves a bright dot by at most 10 % of the size; bilinear sampling keeps its mass."""
    tf.random.set_seed(0)
    img = np.zeros((100, 100, 3), np.float32)
    img[50, 50] = 255.0
    spec = AugmentSpec(shift=0.1, scale=0.0, rotate_deg=0.0)
    moved = 0
    for _ in range(10):
        out = _shift_scale_rotate(tf.constant(img), spec).numpy()[..., 0]
        assert out.sum() == pytest.approx(255.0, abs=1.0)
        ys, xs = np.nonzero(out)
        cy, cx = np.average(ys, weights=out[ys, xs]), np.average(xs, weights=out[ys, xs])
        assert abs(cy - 50) <= 10.5 and abs(cx - 50) <= 10.5
        moved += abs(cy - 50) + abs(cx - 50) > 0.5
    assert moved >= 8


def test_probability_of_flip_is_about_half(tf, image):
    spec = AugmentSpec(p_flip=0.5, p_brightness_contrast=0, p_gamma=0, p_affine=0)
    flipped = sum(not np.array_equal(augment(image, spec).numpy(), image.numpy()) for _ in range(200))
    assert 110 <= flipped <= 190  # P(at least one of two flips) = 0.75; 200 draws
