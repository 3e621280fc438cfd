"""tf.data input pipelines for training and validation: decode, resize, cache, balance, augment."""

from __future__ import annotations

__all__ = ["decode_check", "train_pipeline", "eval_pipeline"]

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from inspectd.errors import DataError
from inspectd.pipeline.engine import RESIZE
from inspectd.toolkit.augment import AugmentSpec, augment
from inspectd.toolkit.dataset import Dataset

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


def _source(ds: Dataset, size: tuple[int, int]) -> tf.data.Dataset:
    paths = [str(it.path) for it in ds.items]
    labels = ds.labels.astype(np.float32)
    out = tf.data.Dataset.from_tensor_slices((paths, labels)).map(_loader(size), num_parallel_calls=tf.data.AUTOTUNE)
    if len(paths) * size[0] * size[1] * 3 <= CACHE_BUDGET_BYTES:
        out = out.cache()
    return out


def _to_float(image, label):
    return tf.cast(image, tf.float32), label


def train_pipeline(
    ds: Dataset, size, batch_size: int, balance: bool, seed: int, spec: AugmentSpec | None = AugmentSpec()
) -> tf.data.Dataset:
    """Endless shuffled (optionally class-balanced) augmented batches."""
    if balance:
        parts = [_source(ds.subset(np.flatnonzero(ds.labels == c)), size) for c in (0, 1)]
        parts = [p.shuffle(4096, seed=seed + c, reshuffle_each_iteration=True).repeat() for c, p in enumerate(parts)]
        out = tf.data.Dataset.sample_from_datasets(parts, weights=[0.5, 0.5], seed=seed)
    else:
        out = _source(ds, size).shuffle(4096, seed=seed, reshuffle_each_iteration=True).repeat()
    out = out.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if spec is not None:
        out = out.map(lambda x, y: (augment(x, spec), y), num_parallel_calls=tf.data.AUTOTUNE)
    return out.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(ds: Dataset, size, batch_size: int) -> tf.data.Dataset:
    """Every image once, in order, unaugmented."""
    return _source(ds, size).map(_to_float).batch(batch_size).prefetch(tf.data.AUTOTUNE)
