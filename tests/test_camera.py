"""The camera worker: frames, ROI, fps_limit, states, reconnect with backoff, stall, stop, logging."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support import CameraHarness, free_port, wait_until

from inspectd.config import CameraConfig
from inspectd.frames import CameraState
from inspectd.metrics import Metrics
from inspectd.sources import CameraWorker, SourceError, backoff_delay
from inspectd.sources.camera import RateLimiter, crop_roi, resize_frame
from inspectd.sources.synthetic import SyntheticSource

FAST = dict(reconnect_initial_s=0.05, reconnect_max_s=0.2, stall_timeout_s=0.5, open_timeout_s=1)


Harness = CameraHarness


def synthetic(query: str = "fps=50&width=160&height=120", **kw) -> CameraConfig:
    return CameraConfig(id="syn", url=f"synthetic://?{query}", **{**FAST, **kw})


# ----------------------------------------------------------------------------- pure parts


def test_backoff_doubles_up_to_the_cap():
    delays = [backoff_delay(n, 0.5, 10, rand=lambda: 0.0) for n in range(8)]
    assert delays == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert backoff_delay(1000, 0.5, 10, rand=lambda: 0.0) == 10  # no overflow after days of retries


def test_backoff_jitter_is_at_most_20_percent():
    draws = [backoff_delay(2, 0.5, 10) for _ in range(2000)]
    assert 2.0 <= min(draws) < 2.05 and 2.35 < max(draws) <= 2.4
    assert backoff_delay(9, 0.5, 10, rand=lambda: 0.999999) <= 12.0


def test_rate_limiter_keeps_the_limit_without_bursts():
    limiter = RateLimiter(10)
    arrivals = [i / 30 + (0.003 if i % 2 else -0.003) for i in range(300)]  # 30 fps with jitter, 10 s
    accepted = [t for t in arrivals if limiter.allow(t)]
    assert 98 <= len(accepted) <= 101
    assert min(np.diff(accepted)) >= 0.05
    assert all(RateLimiter(0).allow(t) for t in arrivals)


def test_crop_roi_clips_and_copies():
    img = np.arange(120 * 160 * 3, dtype=np.uint32).reshape(120, 160, 3).astype(np.uint8)
    out = crop_roi(img, (10, 20, 50, 40))
    assert out.shape == (40, 50, 3) and np.array_equal(out, img[20:60, 10:60]) and out.base is None
    assert crop_roi(img, (150, 100, 50, 50)).shape == (20, 10, 3)
    with pytest.raises(SourceError, match="outside the 160x120 frame"):
        crop_roi(img, (200, 0, 10, 10))


# ----------------------------------------------------------------------------- frames


def test_frames_flow_with_sequence_numbers_states_and_metrics():
    with Harness(synthetic()) as h:
        assert h.worker._thread.name == "capture:syn"
        wait_until(lambda: len(h.frames) >= 10, 5)
        assert h.worker.state is CameraState.UP and h.metric("camera_up") == 1
        f = h.frames[0]
        assert f.camera == "syn" and f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8
        assert [x.seq for x in h.frames[:10]] == list(range(1, 11))
        assert abs(f.captured_at - time.time()) < 5 and f.captured_mono <= time.monotonic()
        assert h.worker.last_frame_mono is not None
    assert h.worker.state is CameraState.STOPPED and h.metric("camera_up") == 0
    assert h.metric("frames_captured_total") == h.frames[-1].seq
    assert [s for s, _ in h.states] == [CameraState.UP, CameraState.STOPPED]


def test_roi_is_applied():
    with Harness(synthetic(roi=(10, 20, 50, 40))) as h:
        wait_until(lambda: h.frames, 5)
    assert h.frames[0].image.shape == (40, 50, 3)


def test_roi_then_resize():
    with Harness(synthetic(roi=(10, 20, 50, 40), resize=(32, 16))) as h:
        wait_until(lambda: h.frames, 5)
    assert h.frames[0].image.shape == (16, 32, 3) and h.frames[0].image.dtype == np.uint8


def test_resize_frame_keeps_content():
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, 80:] = 200  # right half bright
    out = resize_frame(img, (40, 30))
    assert out.shape == (30, 40, 3) and out[:, :19].max() == 0 and out[:, 21:].min() == 200
    assert resize_frame(img, None) is img and resize_frame(img, (160, 120)) is img


def test_fps_limit_drops_and_counts(monkeypatch):
    from inspectd.sources import synthetic as synthetic_module

    rendered = []
    real_render = synthetic_module.render
    monkeypatch.setattr(synthetic_module, "render", lambda *a, **kw: rendered.append(1) or real_render(*a, **kw))
    with Harness(synthetic("fps=40&width=32&height=24", fps_limit=10)) as h:
        wait_until(lambda: h.metric("frames_captured_total") >= 60, 20, "60 frames captured at 40 fps")
    captured, delivered = h.metric("frames_captured_total"), len(h.frames)
    dropped = h.metric("frames_dropped_total", reason="fps_limit")
    assert captured == delivered + dropped and dropped > 0
    # The dropped frames were never rendered (the source skips them): only the delivered ones, give or take
    # the one in hand when the harness stopped.
    assert delivered <= len(rendered) <= delivered + 1, (len(rendered), delivered, dropped)
    # Every captured frame has a seq; the delivered ones show the drops as gaps.
    seqs = [f.seq for f in h.frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == delivered and seqs[-1] <= captured
    # The limit holds in the frames' own capture times (not the test's clock): never two frames closer than
    # half a period (the limiter's re-anchor), and at most 10 per second on average.
    times = np.array([f.captured_mono for f in h.frames])
    assert np.diff(times).min() >= 0.05 - 1e-6, np.diff(times)
    assert (delivered - 1) / (times[-1] - times[0]) <= 10 * 1.05, (delivered, times[-1] - times[0])


def test_synthetic_mask_is_reachable_through_the_worker():
    with Harness(synthetic("fps=50&width=64&height=48&seed=4&repeat=1&defect_rate=1")) as h:
        wait_until(lambda: h.frames, 5)
        src = h.worker.source
    assert isinstance(src, SyntheticSource) and src.last_mask.any()
    assert np.array_equal(h.frames[0].image[..., 0], src.sample(0).image)


# ----------------------------------------------------------------------------- failures


class Scripted:
    """A test Source: each open() plays the next script entry, a number of frames (then silence) or an error."""

    def __init__(self, script: list[int | Exception]):
        self.script, self.opens, self.closes, self._left = list(script), 0, 0, 0

    def open(self) -> None:
        step = self.script[min(self.opens, len(self.script) - 1)]
        self.opens += 1
        if isinstance(step, Exception):
            raise step
        self._left = step

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | None:
        if self._left <= 0:
            time.sleep(timeout_s)  # a stalled camera: nothing, without an error
            return None
        self._left -= 1
        time.sleep(0.01)
        return np.zeros((8, 8, 3), np.uint8)

    def close(self) -> None:
        self.closes += 1


def test_stall_reconnects_and_comes_back_up():
    src = Scripted([5, SourceError("connection refused"), 1000])
    cfg = CameraConfig(id="st", url="rtsp://x/y", **FAST)
    with Harness(cfg, source_factory=lambda c: src) as h:
        wait_until(lambda: src.opens >= 3 and h.worker.state is CameraState.UP, 10)
        frames_before = len(h.frames)
        wait_until(lambda: len(h.frames) > frames_before + 5, 5)
    states = [s for s, _ in h.states]
    assert states == [CameraState.UP, CameraState.DOWN, CameraState.UP, CameraState.STOPPED]
    assert "stalled: no frame for" in h.states[1][1]
    assert h.metric("camera_reconnects_total") == 2
    assert src.closes >= src.opens  # every session was closed, the failed open included


def test_a_session_that_never_delivers_says_so():
    src = Scripted([0, 3])  # opens, never a frame; then a session that delivers and stalls
    cfg = CameraConfig(id="mute", url="rtsp://x/y", **FAST)
    with Harness(cfg, source_factory=lambda c: src) as h:
        wait_until(lambda: len(h.states) >= 3, 10)
    assert "no frame within" in h.states[0][1] and "not answering" in h.states[0][1]
    assert h.states[1][0] is CameraState.UP and "stalled: no frame for" in h.states[2][1]


def test_camera_down_at_startup_keeps_retrying_and_stops_at_once(tmp_path):
    cfg = CameraConfig(id="gone", url=f"dir://{tmp_path}/missing", **{**FAST, "reconnect_max_s": 0.1})
    with Harness(cfg) as h:
        wait_until(lambda: h.metric("camera_reconnects_total") >= 5, 5)
        beat = h.worker.heartbeat_mono
        wait_until(lambda: h.worker.heartbeat_mono > beat, 5, "the worker's heartbeat to advance while down")
        assert h.worker.state is CameraState.DOWN and h.metric("camera_up") == 0
        assert h.worker._thread.is_alive()
    assert [s for s, _ in h.states] == [CameraState.DOWN, CameraState.STOPPED]


def test_stop_interrupts_a_long_backoff(tmp_path):
    cfg = CameraConfig(id="slow", url=f"dir://{tmp_path}/missing", reconnect_initial_s=30, reconnect_max_s=60)
    h = Harness(cfg)
    h.worker.start()
    wait_until(lambda: h.worker.state is CameraState.DOWN, 5)
    h.worker.stop()
    # The worker is in a 30-36 s backoff: ending well before it means stop() interrupted it.
    assert h.worker.join(10.0), "the capture thread sat out its backoff instead of stopping"
    assert h.metric("camera_reconnects_total") == 0


@pytest.mark.parametrize(
    "cfg",
    [
        synthetic("fps=0.05&width=32&height=24"),
        CameraConfig(
            id="g", pipeline="videotestsrc is-live=true ! video/x-raw,width=32,height=24,framerate=1/20", stall_timeout_s=60
        ),
    ],
    ids=["synthetic", "gstreamer"],
)
def test_stop_is_prompt(cfg):
    """A camera sending a frame every 20 s: stop() does not wait for the next frame."""
    h = Harness(cfg)
    h.worker.start()
    wait_until(lambda: h.frames, 10, "the first frame")
    h.worker.stop()
    assert h.worker.state is CameraState.STOPPED
    assert h.worker.join(10.0), "the capture thread waited for the next frame (due 20 s after the first)"
    assert len(h.frames) == 1


def test_end_of_folder_without_loop_stays_down_without_reconnecting(tmp_path):
    from inspectd.imageio import write_png

    for i in range(3):
        write_png(tmp_path / f"{i}.png", np.full((12, 16, 3), i, np.uint8))
    with Harness(CameraConfig(id="f", url=f"dir://{tmp_path}?fps=50", loop=False, **FAST)) as h:
        wait_until(lambda: h.worker.state is CameraState.DOWN, 5)
        down_at = time.monotonic()
        # The worker's own heartbeat shows it has idled 0.5 s since: a reconnect (after 0.05 s) would have happened.
        wait_until(lambda: h.worker.heartbeat_mono > down_at + 0.5, 5, "the worker to idle 0.5 s while down")
        assert h.metric("camera_reconnects_total") == 0 and len(h.frames) == 3
        assert h.worker._thread.is_alive()
    assert "end of folder" in h.states[1][1]


def test_a_slow_paced_source_is_not_a_stall():
    # 2 fps: 0.5 s between frames, longer than the 0.3 s stall timeout; the worker allows two periods.
    with Harness(synthetic("fps=2&width=32&height=24", stall_timeout_s=0.3)) as h:
        wait_until(lambda: len(h.frames) >= 3, 5)
    assert [s for s, _ in h.states] == [CameraState.UP, CameraState.STOPPED]


def test_decode_errors_are_dropped_and_counted(tmp_path):
    from inspectd.imageio import write_png

    write_png(tmp_path / "a.png", np.zeros((12, 16, 3), np.uint8))
    (tmp_path / "b.png").write_bytes(b"garbage")
    with Harness(CameraConfig(id="d", url=f"dir://{tmp_path}?fps=50", **FAST)) as h:
        wait_until(lambda: h.metric("frames_dropped_total", reason="decode") >= 2, 5)
        assert h.worker.state is CameraState.UP


def test_unexpected_errors_are_logged_with_the_camera_and_never_escape(caplog):
    calls = []

    def factory(cfg):
        calls.append(1)
        raise RuntimeError("boom")

    with (
        caplog.at_level(logging.INFO, logger="inspectd.sources"),
        Harness(CameraConfig(id="bug", url="rtsp://x/y", **FAST), source_factory=factory) as h,
    ):
        wait_until(lambda: len(calls) >= 3, 5)
        assert h.worker.state is CameraState.DOWN
    records = [r for r in caplog.records if r.name == "inspectd.sources"]
    assert any("camera bug: unexpected error" in r.getMessage() and r.exc_info for r in records)
    assert any(r.levelno == logging.WARNING and "boom; reconnecting in" in r.getMessage() for r in records)


def test_failing_callbacks_and_sinks_do_not_kill_the_worker(caplog):
    def bad_state(cam, state, detail):
        raise ValueError("callback bug")

    def bad_sink(frame):
        raise KeyError("sink bug")

    worker = CameraWorker(synthetic(), bad_sink, Metrics(CollectorRegistry()), on_state=bad_state)
    with caplog.at_level(logging.INFO, logger="inspectd.sources"):
        worker.start()
        wait_until(lambda: sum("sink bug" in r.getMessage() for r in caplog.records) >= 2, 5)
        assert worker._thread.is_alive()
        worker.stop()
        assert worker.join(2.0)
    assert any("on_state callback failed" in r.getMessage() for r in caplog.records)


def test_credentials_never_reach_the_log(caplog):
    cfg = CameraConfig(id="sec", url=f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/cam", **FAST)
    with caplog.at_level(logging.INFO, logger="inspectd.sources"), Harness(cfg) as h:
        wait_until(lambda: h.metric("camera_reconnects_total") >= 2, 10)
    text = "\n".join(r.getMessage() for r in caplog.records) + "".join(d for _, d in h.states)
    assert "hunter2" not in text and "admin:***@127.0.0.1" in text
