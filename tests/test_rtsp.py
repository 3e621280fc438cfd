"""Against a real RTSP camera (GStreamer's RTSP server in its own process): read, lose, freeze, recover.

Timeouts are short (open/read 1 s, stall 1 s) so that every fault plays out in a few seconds.
Measured times are printed (run with -s to see them).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rtsp import RtspServer, counter_match, read_frames, synthetic_frame
from support import free_port, wait_until
from tcp_proxy import TcpProxy

from inspectd.config import CameraConfig
from inspectd.frames import CameraState
from inspectd.metrics import Metrics
from inspectd.sources import CameraWorker, SourceError, open_source
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
        self.worker = CameraWorker(
            CameraConfig(id=cam_id, **{**FAST, **cfg}),
            self.frames.append,
            Metrics(self.registry),
            on_state=lambda c, s, d: self.states.append((s, d)),
        )
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


def test_opencv_reads_the_rtsp_camera(camera):
    frames = read_frames(OpenCVSource(CameraConfig(id="cv", url=camera.url, **FAST)), 5)
    assert len(frames) == 5 and frames[0].shape == (120, 160, 3) and frames[0].dtype == np.uint8


@pytest.mark.parametrize("cfg", ["url", "pipeline"])
def test_gstreamer_reads_the_rtsp_camera(camera, cfg):
    if cfg == "url":
        c = CameraConfig(id="gst", url=camera.url, backend="gstreamer", **FAST)
    else:
        c = CameraConfig(
            id="gst",
            pipeline=f"rtspsrc location={camera.url} latency=0 protocols=tcp ! "
            "rtph264depay ! avdec_h264 ! videoconvert ! appsink",
            **FAST,
        )
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


def _read_multi_slice(backend: str, n: int) -> tuple[list[np.ndarray], list[int]]:
    """n frames of a 4-slice counter stream read with `backend`, and the slices the proxy saw per frame."""
    with (
        RtspServer(mode="counter", width=320, height=240, fps=FPS, slices=4, tcp_only=True) as server,
        TcpProxy(server.port) as proxy,
    ):
        frames = read_frames(open_source(CameraConfig(id="slices", url=proxy.url(), backend=backend, **FAST)), n)
        proxy.check()
        return frames, proxy.slices_per_frame()


@pytest.mark.parametrize("backend", ["auto", "gstreamer"])
def test_multi_slice_frames_arrive_whole(backend):
    """A camera sending 4 H.264 slices per frame: every frame received is one frame sent, whole.

    Each frame sent has a texture of its own, so a band of a received frame that came from another
    frame, or that the decoder made up, does not match (counter_match). A proxy counts the slices of
    each frame: the camera did send 4.
    """
    frames, slices = _read_multi_slice(backend, 50)
    assert len(frames) == 50 and slices and all(n == 4 for n in slices), slices
    shown = set()
    for i, frame in enumerate(frames):
        k, errors = counter_match(frame)
        assert max(errors) < 10, f"frame {i} is not frame {k} as sent: band errors {[round(e) for e in errors]}"
        shown.add(k)
    assert len(shown) >= 4  # the frames did change: a stream stuck on one picture would pass the check above


def test_opencv_warns_about_multi_slice_streams(caplog):
    """OpenCV returns the slices of such a stream as separate, torn frames (measured): it cannot be
    made whole there, but it is noticed (the slices share a timestamp) and the log names the fix."""
    with caplog.at_level(logging.WARNING, logger="inspectd.sources"):
        frames, _ = _read_multi_slice("opencv", 30)
    torn = sum(max(counter_match(f)[1]) >= 10 for f in frames)
    said = [r.getMessage() for r in caplog.records if "slices per frame" in r.getMessage()]
    assert len(said) == 1 and 'backend = "gstreamer"' in said[0], said
    print(f"\nopencv: {torn} of {len(frames)} frames torn")


@pytest.mark.parametrize("backend", ["auto", "opencv"])
def test_credentials_with_reserved_characters(backend):
    """A camera asking for a login whose name and password hold '@', ':', '/', ' ' and '%' (percent-encoded
    in the URL, as they must be): the right ones play, wrong ones fail with the password redacted."""
    user, password = "op@line", "p@ss:w/rd %1"
    with RtspServer(mode="counter", fps=FPS, auth=(user, password)) as server:
        frames = read_frames(
            open_source(CameraConfig(id="login", url=server.url_with(user, password), backend=backend, **FAST)), 3
        )
        assert len(frames) == 3
        wrong = open_source(CameraConfig(id="login", url=server.url_with(user, "guess"), backend=backend, **FAST))
        with pytest.raises(SourceError) as failed:
            read_frames(wrong, 1)
    assert "guess" not in str(failed.value) and ":***@" in str(failed.value)


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
        print(
            f"\n{backend}: kill -> DOWN {to_down:.2f} s; restart -> UP {to_up:.2f} s; "
            f"reconnects {w.metric('camera_reconnects_total'):.0f}; outage {restarted + to_up - killed:.1f} s"
        )
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
        print(
            f"\n{backend}: freeze -> DOWN {to_down:.2f} s; thaw -> UP {to_up:.2f} s; "
            f"reconnects {w.metric('camera_reconnects_total'):.0f}"
        )
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
