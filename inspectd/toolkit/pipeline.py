"""tf.data input pipelines for training and validation: decode, resize, cache, balance, augment (and the pixel
targets of mask supervision: a defect mask and its weight, moved with the image)."""

from __future__ import annotations

__all__ = ["PixelTargets", "decode_check", "sampling_groups", "train_pipeline", "eval_pipeline"]

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from inspectd.errors import DataError
from inspectd.pipeline.engine import RESIZE
from inspectd.toolkit.augment import AugmentSpec, augment
from inspectd.toolkit.dataset import Dataset, Item


@dataclass(frozen=True)
class PixelTargets:
    """Which images get pixel supervision on cam_logits: defects with a mask, and ok images (all background) when
    `ok_negatives`; every other image weighs 0 in the pixel loss."""

    ok_negatives: bool = True

    def uses(self, item: Item) -> bool:
        return item.mask is not None if item.label == 1 else self.ok_negatives


# Keep decoded, resized images in RAM when they fit this budget (uint8), else decode each epoch.
CACHE_BUDGET_BYTES = 2 << 30


def decode_check(ds: Dataset, progress: Callable[[int, int], None] | None = None) -> list[tuple[int, int]]:
    """Decode every image once with the same decoder training uses; returns (width, height) each.

    An unreadable file is reported before training starts, not as a crash in epoch 7.
    """
    sizes = []
    for i, item in enumerate(ds.items):
        try:
            shape = tf.io.decode_image(tf.io.read_file(str(item.path)), channels=3, expand_animations=False).shape
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            raise DataError(f"{item.path}: not a readable image (corrupt or unsupported format)") from None
        sizes.append((int(shape[1]), int(shape[0])))
        if progress:
            progress(i + 1, len(ds.items))
    return sizes


def _loader(size: tuple[int, int]):
    w, h = size

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        image = tf.image.resize(image, (h, w), **RESIZE)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    return load


def _target_loader(size: tuple[int, int]):
    """(mask path or "", supervised 0/1) -> uint8 [h, w, 2]: the defect's share of each pixel at the input size
    (0..255, the mask resized as the image is) and the pixel loss's weight (255 where supervised)."""
    w, h = size

    def load(mask_path, supervised):
        def read():
            mask = tf.io.decode_image(tf.io.read_file(mask_path), channels=1, dtype=tf.uint8, expand_animations=False)
            mask.set_shape([None, None, 1])
            mask = tf.cast(mask > 0, tf.float32) * 255.0
            return tf.image.resize(mask, (h, w), **RESIZE)

        mask = tf.cond(tf.strings.length(mask_path) > 0, read, lambda: tf.zeros((h, w, 1), tf.float32))
        weight = tf.fill((h, w, 1), 255.0 * supervised)
        return tf.cast(tf.clip_by_value(tf.round(tf.concat([mask, weight], -1)), 0, 255), tf.uint8)

    return load


def _source(ds: Dataset, size: tuple[int, int], pixels: PixelTargets | None = None) -> tf.data.Dataset:
    """(image uint8, label) per item, or (image, label, targets uint8 [h, w, 2]) with pixel supervision."""
    paths = [str(it.path) for it in ds.items]
    labels = ds.labels.astype(np.float32)
    images = tf.data.Dataset.from_tensor_slices((paths, labels)).map(_loader(size), num_parallel_calls=tf.data.AUTOTUNE)
    if pixels is None:
        out = images
    else:
        masks = [str(it.mask) if pixels.uses(it) and it.mask is not None else "" for it in ds.items]
        supervised = np.array([float(pixels.uses(it)) for it in ds.items], np.float32)
        targets = tf.data.Dataset.from_tensor_slices((masks, supervised)).map(
            _target_loader(size), num_parallel_calls=tf.data.AUTOTUNE
        )
        out = tf.data.Dataset.zip((images, targets)).map(lambda il, t: (il[0], il[1], t))
    if len(paths) * size[0] * size[1] * (3 if pixels is None else 5) <= CACHE_BUDGET_BYTES:
        out = out.cache()
    return out


def _to_float(image, label, targets=None):
    if targets is None:
        return tf.cast(image, tf.float32), label
    return tf.cast(image, tf.float32), label, tf.cast(targets, tf.float32) / 255.0


def _as_xy(image, label, targets=None):
    """Keras' (x, y): y is the label, or {"score": label, "cam": targets} with pixel supervision."""
    return (image, label) if targets is None else (image, {"score": label, "cam": targets})


def sampling_groups(ds: Dataset, balance: bool, mask_share: float = 0.0) -> list[tuple[np.ndarray, float]]:
    """(item indices, share of the batches) to draw from: the classes at 50/50 with `balance`, else as found; with
    `mask_share` > 0 the defect images with a mask are drawn apart, at least that share of all images (taken from
    the defect images' share, at most half of it): ten masks among a hundred defects would otherwise come once in
    twenty images."""
    labels = ds.labels
    shares = [0.5, 0.5] if balance else [float(np.mean(labels == c)) for c in (0, 1)]
    masked = np.array([it.label == 1 and it.mask is not None for it in ds.items])
    plain = (labels == 1) & ~masked
    if mask_share <= 0 or not masked.any() or not plain.any():
        groups = [(np.flatnonzero(labels == c), shares[c]) for c in (0, 1)] if balance else [(np.arange(len(labels)), 1.0)]
        return [(index, share) for index, share in groups if len(index)]
    natural = shares[1] * masked.sum() / (masked.sum() + plain.sum())
    # Never above half the defects' share (unless found so): the defects without a mask keep the verdict's half.
    boosted = min(max(natural, mask_share), max(natural, shares[1] / 2))
    groups = [
        (np.flatnonzero(labels == 0), shares[0]),
        (np.flatnonzero(masked), boosted),
        (np.flatnonzero(plain), shares[1] - boosted),
    ]
    return [(index, share) for index, share in groups if len(index) and share > 0]


def train_pipeline(
    ds: Dataset,
    size,
    batch_size: int,
    balance: bool,
    seed: int,
    spec: AugmentSpec | None = AugmentSpec(),
    pixels: PixelTargets | None = None,
    mask_share: float = 0.0,
) -> tf.data.Dataset:
    """Endless shuffled (optionally class-balanced) augmented batches; with `pixels`, the pixel targets too, and the
    masked defect images drawn at `mask_share` at least (sampling_groups)."""
    groups = sampling_groups(ds, balance, mask_share if pixels is not None else 0.0)
    if len(groups) > 1:
        parts = [_source(ds.subset(index), size, pixels) for index, _ in groups]
        parts = [p.shuffle(4096, seed=seed + c, reshuffle_each_iteration=True).repeat() for c, p in enumerate(parts)]
        out = tf.data.Dataset.sample_from_datasets(parts, weights=[share for _, share in groups], seed=seed)
    else:
        out = _source(ds, size, pixels).shuffle(4096, seed=seed, reshuffle_each_iteration=True).repeat()
    out = out.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if spec is not None and pixels is None:
        out = out.map(lambda x, y: (augment(x, spec), y), num_parallel_calls=tf.data.AUTOTUNE)
    elif spec is not None:
        out = out.map(lambda x, y, t: (*_swap(augment(x, spec, t), y),), num_parallel_calls=tf.data.AUTOTUNE)
    return out.map(_as_xy).batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _swap(image_targets, label):
    image, targets = image_targets
    return image, label, targets


def eval_pipeline(ds: Dataset, size, batch_size: int, pixels: PixelTargets | None = None) -> tf.data.Dataset:
    """Every image once, in order, unaugmented; with `pixels`, the pixel targets too (validation loss)."""
    return _source(ds, size, pixels).map(_to_float).map(_as_xy).batch(batch_size).prefetch(tf.data.AUTOTUNE)
