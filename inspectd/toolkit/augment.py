"""The reference's augmentations (Albumentations in the notebook), as TensorFlow ops for tf.data.

flip V/H (p 0.5 each), brightness/contrast (p 0.2), gamma (p 0.2), shift/scale/rotate (p 0.2,
shift +-10 %, scale +-5 %, rotate +-5 deg). Images are float32 RGB in 0..255; pixel targets (mask
supervision) move with the image through the geometric ones. Written with plain
tf.image / ImageProjectiveTransformV3 ops so they run inside the input pipeline's threads.
"""

from __future__ import annotations

__all__ = ["AugmentSpec", "augment"]

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class AugmentSpec:
    p_flip: float = 0.5
    p_brightness_contrast: float = 0.2
    brightness: float = 0.2  # +- fraction of full range, as Albumentations' RandomBrightnessContrast
    contrast: float = 0.2
    p_gamma: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.2)
    p_affine: float = 0.2
    shift: float = 0.10
    scale: float = 0.05
    rotate_deg: float = 5.0


def _maybe(p: float, fn, image):
    return tf.cond(tf.random.uniform(()) < p, lambda: fn(image), lambda: image)


def _brightness_contrast(image, spec: AugmentSpec):
    alpha = 1.0 + tf.random.uniform((), -spec.contrast, spec.contrast)
    beta = 255.0 * tf.random.uniform((), -spec.brightness, spec.brightness)
    return tf.clip_by_value(image * alpha + beta, 0.0, 255.0)


def _gamma(image, spec: AugmentSpec):
    g = tf.random.uniform((), *spec.gamma)
    return 255.0 * tf.pow(image / 255.0, g)


def _shift_scale_rotate(image, spec: AugmentSpec):
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    angle = tf.random.uniform((), -spec.rotate_deg, spec.rotate_deg) * (math.pi / 180.0)
    scale = 1.0 + tf.random.uniform((), -spec.scale, spec.scale)
    tx = tf.random.uniform((), -spec.shift, spec.shift) * w
    ty = tf.random.uniform((), -spec.shift, spec.shift) * h
    # Output pixel (x, y) samples input at A @ (x, y) + t: the inverse of rotate+scale about the
    # centre followed by the shift.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = w / 2.0, h / 2.0
    a0, a1 = cos, sin
    b0, b1 = -sin, cos
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def _photometric(fn):
    """Apply `fn` to the image's 3 channels only, leaving any stacked pixel targets as they are."""
    return lambda x: tf.concat([fn(x[..., :3]), x[..., 3:]], axis=-1)


def augment(image, spec: AugmentSpec = AugmentSpec(), targets=None):
    """One random augmentation of an HxWx3 float32 image (0..255).

    With `targets` (HxWxK float32 pixel targets, e.g. a defect mask and its weight) the geometric
    transforms (flips, shift/scale/rotate) move the targets with the image and the photometric ones
    leave them alone; returns (image, targets) then. The random draws are the same either way."""
    x = image if targets is None else tf.concat([image, targets], axis=-1)
    x = _maybe(spec.p_flip, tf.image.flip_left_right, x)
    x = _maybe(spec.p_flip, tf.image.flip_up_down, x)
    x = _maybe(spec.p_brightness_contrast, _photometric(lambda v: _brightness_contrast(v, spec)), x)
    x = _maybe(spec.p_gamma, _photometric(lambda v: _gamma(v, spec)), x)
    x = _maybe(spec.p_affine, lambda v: _shift_scale_rotate(v, spec), x)
    return x if targets is None else (x[..., :3], x[..., 3:])
