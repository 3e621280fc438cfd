"""The training resize without TensorFlow: antialiased bilinear, as `tf.image.resize(..., "bilinear", antialias=True)`.

Training, `infer`, `evaluate` and the TensorFlow runtime resize with TensorFlow's ScaleAndTranslate
(triangle kernel, widened by the downscale factor: a low-pass filter, not point sampling). ONNX
Runtime and OpenVINO get frames resized here, so a daemon without TensorFlow sees the same input
the model was trained on. Written by hand because no installed library has this kernel: OpenCV's
INTER_LINEAR does not antialias and INTER_AREA is a box filter, ONNX `Resize` with antialias
differs from TensorFlow by up to 12 grey levels and OpenVINO ignores the flag (measured).

The weights are TensorFlow's (`scale_and_translate_op.cc`, ComputeSpansCore: sample at
(x + 0.5) / scale, triangle of radius max(1 / scale, 1), weights normalised per output pixel, all
in float32 as there), computed once per (input, output) size; each axis is then a short sum of
gathered rows or columns (span = 2 * ceil(1 / scale) + 1 taps). Agreement with TensorFlow: within
`TOLERANCE` grey levels on random sizes and images (tests/test_resize.py); bit-identical on the
camera sizes measured (320x240 to 2448x2048 into 160x128 to 320x256).
"""

from __future__ import annotations

__all__ = ["TOLERANCE", "Spans", "spans", "resize"]

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

TOLERANCE = 2e-3  # grey levels (0..255) from tf.image.resize: float32 sums in another order


@dataclass(frozen=True)
class Spans:
    """One axis: output pixel i = sum_k weights[i, k] * input[index[i, k]] (weights 0 where a span is shorter)."""

    index: np.ndarray  # [out, taps] int
    weights: np.ndarray  # [out, taps] float32


@lru_cache(maxsize=64)
def spans(in_size: int, out_size: int) -> Spans:
    """TensorFlow's triangle-kernel spans for resizing one axis from `in_size` to `out_size` pixels, in float32 as
    TensorFlow computes them (positions, kernel, weight sum and normalisation)."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0 / float(scale))  # `const float inv_scale = 1.0 / scale;`
    kernel_scale = max(inv_scale, f32(1.0))  # antialias: widen the kernel when downsampling
    one_over_kernel_scale = f32(1.0) / kernel_scale
    radius = kernel_scale  # the triangle's radius is 1 before scaling
    taps = min(2 * math.ceil(float(radius)) + 1, in_size)
    index = np.zeros((out_size, taps), np.int64)
    weights = np.zeros((out_size, taps), np.float32)
    for x in range(out_size):
        sample = (f32(x) + f32(0.5)) * inv_scale
        start = min(max(math.ceil(float(sample - radius - f32(0.5))), 0), in_size - 1)
        end = min(max(math.floor(float(sample + radius - f32(0.5))), 0), in_size - 1) + 1
        source = np.arange(start, end).astype(np.float32)
        position = np.abs((source + f32(0.5) - sample) * one_over_kernel_scale)
        w = np.where(position < 1, f32(1) - position, f32(0)).astype(np.float32)
        total = f32(0)
        for value in w:  # TensorFlow sums in order, in float32
            total = f32(total + value)
        index[x, : end - start] = np.arange(start, end)
        index[x, end - start :] = end - 1  # padding taps read a valid pixel with weight 0
        if abs(float(total)) >= 1000.0 * float(np.finfo(np.float32).tiny):
            weights[x, : end - start] = w * (f32(1) / total)
    return Spans(index, weights)


def _rows(x: np.ndarray, s: Spans, out: np.ndarray) -> np.ndarray:
    """Resample the first axis of `x` [H, ...] into `out` [h, ...] float32 with spans `s`.

    One frame at a time and into preallocated arrays: the temporaries stay in the CPU's cache (a whole
    batch at once was 3x slower at batch 4, measured)."""
    tmp = np.empty(out.shape, np.float32)
    np.multiply(x[s.index[:, 0]], s.weights[:, 0, None, None], out=out)
    for k in range(1, s.weights.shape[1]):
        np.multiply(x[s.index[:, k]], s.weights[:, k, None, None], out=tmp)
        out += tmp
    return out


def resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (or float) [n, H, W, C] -> float32 [n, h, w, C] 0..255 at `size` (h, w); a batch already at `size` is
    only cast (as TensorFlow does)."""
    n, height, width, channels = batch.shape
    h, w = size
    if (height, width) == (h, w):
        return batch.astype(np.float32)
    rows, cols = spans(height, h), spans(width, w)
    out = np.empty((n, h, w, channels), np.float32)
    between = np.empty((h, width, channels), np.float32)
    across = np.empty((w, h, channels), np.float32)
    for i in range(n):
        _rows(batch[i], rows, between)  # rows first, gathering uint8 rows of the frame
        _rows(np.ascontiguousarray(between.transpose(1, 0, 2)), cols, across)  # then columns, as rows of the transpose
        out[i] = across.transpose(1, 0, 2)
    return out
