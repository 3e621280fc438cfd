"""Folder camera with an unreadable file: reported once per file, counted as dropped on every pass."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support import wait_until

from inspectd.config import CameraConfig
from inspectd.imageio import write_png
from inspectd.metrics import Metrics
from inspectd.sources import DecodeError
from inspectd.sources.camera import CameraWorker
from inspectd.sources.folder import FolderSource


def _png(value: int, size: tuple[int, int] = (32, 24)) -> bytes:
    img = np.full((size[1], size[0], 3), value, np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _corrupt(path: Path) -> None:
    """A real PNG cut in half: the signature and IHDR are fine, the image data is not."""
    data = _png(200, (64, 48))
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def folder(tmp_path) -> Path:
    """a.png (10), b.png (corrupt), c.png (30)."""
    for name, value in (("a.png", 10), ("c.png", 30)):
        write_png(tmp_path / name, np.full((24, 32, 3), value, np.uint8))
    _corrupt(tmp_path / "b.png")
    return tmp_path


def _read_pass(src: FolderSource, n: int) -> list[object]:
    """n reads in order: each an image's red value, or the DecodeError raised."""
    out: list[object] = []
    deadline = time.monotonic() + 5.0
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} reads within 5 s"
        try:
            img = src.read(0.2)
        except DecodeError as exc:
            out.append(exc)
            continue
        if img is not None:
            out.append(int(img[0, 0, 0]))
    return out


def test_corrupt_file_reported_once_then_repeated(folder):
    src = FolderSource(CameraConfig(id="cam", url=f"dir://{folder}?fps=200", loop=True))
    src.open()
    reads = _read_pass(src, 9)  # three passes over a, b, c
    assert [r if isinstance(r, int) else "err" for r in reads] == [10, "err", 30] * 3
    errors = [r for r in reads if isinstance(r, DecodeError)]
    assert [e.repeated for e in errors] == [False, True, True]
    assert all("b.png" in str(e) for e in errors)


def test_a_fixed_file_is_read_and_a_new_breakage_reported_again(folder):
    src = FolderSource(CameraConfig(id="cam", url=f"dir://{folder}?fps=200", loop=True))
    src.open()
    first = _read_pass(src, 3)
    assert isinstance(first[1], DecodeError) and not first[1].repeated
    (folder / "b.png").write_bytes(_png(20))  # fixed: another size, so another signature
    assert _read_pass(src, 3) == [10, 20, 30]
    _corrupt(folder / "b.png")
    os.utime(folder / "b.png", ns=(1, 1))  # same bytes as the first breakage, but a new mtime
    again = _read_pass(src, 3)
    assert isinstance(again[1], DecodeError) and not again[1].repeated


def test_looping_folder_logs_once_and_counts_every_pass(folder, caplog):
    registry = CollectorRegistry()
    frames: list[int] = []
    lock = threading.Lock()

    def sink(frame) -> None:
        with lock:
            frames.append(int(frame.image[0, 0, 0]))

    def sample(name: str, **labels) -> float:
        return registry.get_sample_value(f"inspectd_{name}", {"camera": "cam", **labels}) or 0.0

    cfg = CameraConfig(id="cam", url=f"dir://{folder}?fps=100", loop=True)
    worker = CameraWorker(cfg, sink=sink, metrics=Metrics(registry))
    caplog.set_level(logging.DEBUG, logger="inspectd.sources")
    worker.start()
    try:
        wait_until(lambda: sample("frames_dropped_total", reason="decode") >= 4, 10.0, "4 passes over b.png")
    finally:
        worker.stop()
        assert worker.join(5.0)
    decode_drops = sample("frames_dropped_total", reason="decode")
    with lock:
        delivered = list(frames)
    lines = [r for r in caplog.records if "b.png" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING
    # Every read is accounted for: delivered or dropped for decode (no fps_limit, no roi here).
    assert sample("frames_captured_total") == len(delivered) + decode_drops
    assert set(delivered) == {10, 30}
    # Passes are a, b, c in order: b.png fails once per pass, and the worker stops mid-pass at worst.
    assert abs(delivered.count(10) - decode_drops) <= 1
