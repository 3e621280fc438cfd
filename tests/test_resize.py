"""The resize the exported runtimes get (inspectd.pipeline.resize, NumPy) against TensorFlow's antialiased bilinear
resize, the one training used: random sizes up and down, random images, within TOLERANCE grey levels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspectd.pipeline import resize

tf = pytest.importorskip("tensorflow")
sizes = st.integers(1, 90)


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, out_h=sizes, out_w=sizes, n=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_the_numpy_resize_is_tensorflows(h, w, out_h, out_w, n, seed):
    batch = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    want = tf.image.resize(batch, (out_h, out_w), method="bilinear", antialias=True).numpy()
    got = resize.resize(batch, (out_h, out_w))
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= resize.TOLERANCE


@pytest.mark.parametrize(
    ("size", "out"),
    [((480, 752), (256, 320)), ((240, 320), (128, 160)), ((960, 1280), (240, 320)), ((2048, 2448), (256, 320))],
)
def test_camera_sizes_to_model_inputs(size, out):
    """The sizes the daemon meets: a camera frame (up to a 5 MP sensor) to a model's input (downscaling by 1.9 to
    8). The spans are computed in float32 as TensorFlow does; measured bit-identical at these sizes."""
    batch = np.random.default_rng(1).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    want = tf.image.resize(batch, out, method="bilinear", antialias=True).numpy()
    assert np.abs(resize.resize(batch, out) - want).max() <= resize.TOLERANCE


def test_the_kernel_antialiases():
    """A one-pixel checkerboard halved is flat grey with the triangle filter; point sampling (no antialias) would
    keep one colour of it. Guards against the kernel losing its widening by the scale."""
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    batch = np.repeat(board[None, :, :, None], 3, axis=3)
    out = resize.resize(batch, (32, 32))
    assert np.abs(out[:, 2:-2, 2:-2] - 127.5).max() < 1.0


def test_a_frame_at_the_input_size_is_only_cast():
    batch = np.random.default_rng(2).integers(0, 256, (1, 20, 30, 3), dtype=np.uint8)
    assert np.array_equal(resize.resize(batch, (20, 30)), batch.astype(np.float32))
