"""Against a real RTSP camera (GStreamer's RTSP server in its own process): read, lose, freeze, recover.

Timeouts are short (open/read 1 s, stall 1 s) so that every fault plays out in a few seconds.
Measured times are printed (run with -s to see them).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rtsp import RtspServer, counter_received, synthetic_frame
from support import free_port, wait_until

from inspectd.frames import CameraState
from inspectd.service.config import CameraConfig
from inspectd.service.metrics import Metrics
from inspectd.sources import CameraWorker, open_source
from inspectd.sources.gstreamer import GstSource
from inspectd.sources.opencv import OpenCVSource

FPS = 25  # FFmpeg probes ~1 s of stream on open; a faster camera opens sooner
FAST = dict(open_timeout_s=1, stall_timeout_s=1, reconnect_initial_s=0.2, reconnect_max_s=1)
# A frozen stream's OpenCV read returns after about 3x its read timeout (measured), then the worker
# notices; allow that plus scheduling slack on a busy 2-core machine.
DOWN_WITHIN = FAST["stall_timeout_s"] + 3 * FAST["open_timeout_s"] + 3


class Worker:
    """A started CameraWorker with its frames, states and metrics."""

    def __init__(self, cam_id: str, **cfg):
        self.registry = CollectorRegistry()
        self.frames, self.states = [], []
        self.cam = cam_id
        self.worker = CameraWorker(CameraConfig(id=cam_id, **{**FAST, **cfg}), self.frames.append,
                                   Metrics(self.registry), on_state=lambda c, s, d: self.states.append((s, d)))
        self.worker.start()

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(f"inspectd_{name}", {"camera": self.cam}) or 0.0

    def is_(self, state: CameraState):
        return lambda: self.worker.state is state

    def flowing(self, n: int = 5, timeout: float = 5.0) -> None:
        before = len(self.frames)
        wait_until(lambda: len(self.frames) >= before + n, timeout)

    def close(self) -> None:
        self.worker.stop()
        # An OpenCV read blocked inside FFmpeg ends within its read timeout (x3 on a frozen stream).
        assert self.worker.join(3 * FAST["open_timeout_s"] + 2)


@pytest.fixture(scope="module")
def camera():
    with RtspServer(fps=FPS) as server:
        yield server


def read_frames(src, n: int, timeout: float = 10.0) -> list[np.ndarray]:
    src.open()
    try:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            img = src.read(0.2)
            if img is not None:
                out.append(img)
        return out
    finally:
        src.close()


def test_opencv_reads_the_rtsp_camera(camera):
    frames = read_frames(OpenCVSource(CameraConfig(id="cv", url=camera.url, **FAST)), 5)
    assert len(frames) == 5 and frames[0].shape == (120, 160, 3) and frames[0].dtype == np.uint8


@pytest.mark.parametrize("cfg", ["url", "pipeline"])
def test_gstreamer_reads_the_rtsp_camera(camera, cfg):
    if cfg == "url":
        c = CameraConfig(id="gst", url=camera.url, backend="gstreamer", **FAST)
    else:
        c = CameraConfig(id="gst", pipeline=f"rtspsrc location={camera.url} latency=0 protocols=tcp ! "
                         "rtph264depay ! avdec_h264 ! videoconvert ! appsink", **FAST)
    frames = read_frames(GstSource(c), 5)
    assert len(frames) == 5 and frames[0].shape == (120, 160, 3) and frames[0].dtype == np.uint8


def test_synthetic_mode_serves_the_known_defect_frame():
    with RtspServer(mode="synthetic", fps=FPS, seed=5) as server:
        frames = read_frames(OpenCVSource(CameraConfig(id="syn", url=server.url, **FAST)), 3)
        mask = server.mask
    served = synthetic_frame(5, 160, 120)
    assert mask.shape == (120, 160) and mask.any() and np.array_equal(mask, served.mask)
    grey = frames[-1].astype(np.float32).mean(axis=2)
    assert np.abs(grey - served.image).mean() < 6  # the same picture, through H.264 (measured 2.8)


@pytest.mark.parametrize("backend", ["auto", "opencv", "gstreamer"])
def test_multi_slice_frames_arrive_whole(backend):
    """A camera sending 4 H.264 slices per frame: every frame received is one frame sent, whole.

    Frame n is flat grey at a level of its own (plus a fixed texture), so a frame made of slices of
    several frames shows as horizontal bands of different levels.
    """
    with RtspServer(mode="counter", width=320, height=240, fps=FPS, slices=4) as server:
        frames = read_frames(open_source(CameraConfig(id="slices", url=server.url, backend=backend, **FAST)), 50)
    assert len(frames) == 50
    sent = np.array([counter_received(n) for n in range(8)])
    levels = set()
    for i, frame in enumerate(frames):
        bands = frame.astype(np.float32).mean(axis=2).reshape(8, -1).mean(axis=1)  # 8 bands of 30 rows
        level = int(np.abs(sent - np.median(bands)).argmin())
        assert np.abs(bands - sent[level]).max() < 15, f"frame {i} is torn: band levels {bands.round()}"
        levels.add(level)
    assert len(levels) >= 4  # the frames did change: a stream stuck on one picture would pass the check above


@pytest.mark.parametrize("backend", ["opencv", "gstreamer"])
def test_camera_loss_goes_down_and_recovers(backend):
    server = RtspServer(fps=FPS).start()
    w = Worker(f"loss-{backend}", url=server.url, backend=backend)
    try:
        wait_until(w.is_(CameraState.UP), 10)
        killed = time.monotonic()
        server.stop(kill=True)
        to_down = wait_until(w.is_(CameraState.DOWN), DOWN_WITHIN)
        wait_until(lambda: w.metric("camera_reconnects_total") >= 2, 10)
        assert w.metric("camera_up") == 0
        server.start()
        restarted = time.monotonic()
        to_up = wait_until(w.is_(CameraState.UP), 15)
        w.flowing()
        print(f"\n{backend}: kill -> DOWN {to_down:.2f} s; restart -> UP {to_up:.2f} s; "
              f"reconnects {w.metric('camera_reconnects_total'):.0f}; outage {restarted + to_up - killed:.1f} s")
    finally:
        w.close()
        server.stop(kill=True)
    assert [s for s, _ in w.states] == [CameraState.UP, CameraState.DOWN, CameraState.UP, CameraState.STOPPED]


@pytest.mark.parametrize("backend", ["opencv", "gstreamer"])
def test_frozen_camera_is_detected_by_the_stall_watchdog(backend):
    server = RtspServer(fps=FPS).start()
    w = Worker(f"frozen-{backend}", url=server.url, backend=backend)
    try:
        wait_until(w.is_(CameraState.UP), 10)
        server.freeze()  # connections stay open, nothing arrives: reads block, then time out
        to_down = wait_until(w.is_(CameraState.DOWN), DOWN_WITHIN)
        # Reconnecting to a hung server must fail within the open timeout, not hang the worker.
        wait_until(lambda: w.metric("camera_reconnects_total") >= 2, 10)
        assert w.worker.state is CameraState.DOWN
        server.thaw()
        to_up = wait_until(w.is_(CameraState.UP), 15)
        w.flowing()
        print(f"\n{backend}: freeze -> DOWN {to_down:.2f} s; thaw -> UP {to_up:.2f} s; "
              f"reconnects {w.metric('camera_reconnects_total'):.0f}")
    finally:
        w.close()
        server.stop(kill=True)


def test_dead_camera_at_startup_retries_without_disturbing_a_live_one(camera):
    dead = Worker("dead", url=f"rtsp://127.0.0.1:{free_port()}/cam")
    live = Worker("live", url=camera.url)
    try:
        wait_until(live.is_(CameraState.UP), 10)
        wait_until(lambda: dead.metric("camera_reconnects_total") >= 3, 10)
        live.flowing(n=int(FPS))  # about a second of uninterrupted frames meanwhile
        assert dead.worker.state is CameraState.DOWN and dead.worker._thread.is_alive()
        assert live.worker.state is CameraState.UP and live.metric("camera_up") == 1
    finally:
        dead.close()
        live.close()
    assert [s for s, _ in dead.states] == [CameraState.DOWN, CameraState.STOPPED]
