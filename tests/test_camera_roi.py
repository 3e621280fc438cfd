"""The camera worker and a bad roi, and a backoff that an UP followed by a failure does not reset.

A roi outside the frame is a configuration problem: the camera stays DOWN with one ERROR, every frame
it read is counted as captured and dropped (reason roi), and it is looked at again every
reconnect_max_s. Before, it went UP at every frame and DOWN right after, twice a second forever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pytest
from support import CameraHarness, wait_until

import inspectd.sources.camera as camera
from inspectd.config import CameraConfig
from inspectd.frames import CameraState
from inspectd.sources import SourceError
from inspectd.sources.camera import RoiError, crop_roi, roi_box


@dataclass
class Session:
    """One open() of a FakeSource: `frames` frames of `shape` (height, width), then `end` raised (None: silence)."""

    frames: int = 0
    shape: tuple[int, int] = (120, 160)
    end: Exception | None = None


class FakeSource:
    """Plays one script entry per open(): an Exception (the open fails) or a Session; the last entry repeats."""

    def __init__(self, script: list[Session | Exception]):
        self.script, self.opens, self.open_times = script, 0, []
        self._session, self._left = Session(), 0

    def open(self) -> None:
        step = self.script[min(self.opens, len(self.script) - 1)]
        self.opens += 1
        self.open_times.append(time.monotonic())
        if isinstance(step, Exception):
            raise step
        self._session, self._left = step, step.frames

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | None:
        if self._left > 0:
            self._left -= 1
            time.sleep(0.005)
            return np.zeros((*self._session.shape, 3), np.uint8)
        if self._session.end is not None:
            raise self._session.end
        time.sleep(timeout_s)
        return None

    def close(self) -> None:
        pass


class Harness(CameraHarness):
    """A worker on a FakeSource plus what it reports: frames, states, metrics."""

    def __init__(self, source: FakeSource, **cfg):
        self.source = source
        cfg = {"id": "roi", "url": "rtsp://x/y", "reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "stall_timeout_s": 5, **cfg}
        super().__init__(CameraConfig(**cfg), source_factory=lambda c: source)

    def accounted(self) -> bool:
        """Every captured frame was delivered or dropped with a reason (nothing else is in flight here)."""
        dropped = sum(self.metric("frames_dropped_total", reason=r) for r in ("roi", "fps_limit", "decode"))
        return self.metric("frames_captured_total") == len(self.frames) + dropped


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inspectd.sources" and r.levelno == level]


# ----------------------------------------------------------------------------- pure parts


def test_roi_box_clips_and_raises_a_roi_error_outside():
    assert roi_box((10, 20, 50, 40), 160, 120) == (10, 20, 60, 60)
    assert roi_box((150, 100, 50, 50), 160, 120) == (150, 100, 160, 120)
    with pytest.raises(RoiError, match=r"roi \[200, 0, 10, 10\] lies outside the 160x120 frame"):
        roi_box((200, 0, 10, 10), 160, 120)
    assert issubclass(RoiError, SourceError)  # anything that handles source errors still handles it
    with pytest.raises(RoiError):
        crop_roi(np.zeros((120, 160, 3), np.uint8), (0, 130, 10, 10))


# ----------------------------------------------------------------------------- the worker


def test_a_roi_outside_the_frame_holds_the_camera_down_with_one_error(caplog):
    src = FakeSource([Session(frames=1000)])
    with caplog.at_level(logging.DEBUG, logger="inspectd.sources"), Harness(src, roi=(200, 0, 10, 10)) as h:
        wait_until(lambda: src.opens >= 4, 10, "three retries")
    assert [s for s, _ in h.states] == [CameraState.DOWN, CameraState.STOPPED]  # never UP
    assert "roi [200, 0, 10, 10] lies outside the 160x120 frame" in h.states[0][1]
    errors = _records(caplog, logging.ERROR)
    assert len(errors) == 1 and "fix this camera's roi" in errors[0] and "every 0.3 s" in errors[0], errors
    assert _records(caplog, logging.WARNING) == []
    # Retried at reconnect_max_s, not on the backoff's 0.05, 0.1, 0.2 steps.
    gaps = np.diff(src.open_times[:4])
    assert (gaps >= 0.3).all(), gaps
    # One frame per attempt, each captured and dropped as roi: none reached the sink.
    assert h.frames == [] and h.metric("frames_captured_total") >= 4
    assert h.metric("frames_dropped_total", reason="roi") == h.metric("frames_captured_total") and h.accounted()


def test_a_camera_that_was_down_before_its_first_frame_still_logs_the_roi_error(caplog):
    src = FakeSource([SourceError("connection refused"), Session(frames=1000)])
    with caplog.at_level(logging.DEBUG, logger="inspectd.sources"), Harness(src, roi=(0, 500, 10, 10)) as h:
        wait_until(lambda: src.opens >= 4, 10, "two retries after the first frame")
    errors = _records(caplog, logging.ERROR)
    assert len(errors) == 1 and "roi [0, 500, 10, 10] lies outside the 160x120 frame" in errors[0], errors
    assert CameraState.UP not in [s for s, _ in h.states] and h.frames == [] and h.accounted()


def test_a_roi_that_fits_the_next_frames_brings_the_camera_up():
    src = FakeSource([Session(frames=1, shape=(8, 8), end=None), Session(frames=1000, shape=(300, 300))])
    with Harness(src, roi=(100, 100, 50, 40)) as h:
        wait_until(lambda: len(h.frames) >= 5, 10, "frames after the camera changed size")
    assert [s for s, _ in h.states][:2] == [CameraState.DOWN, CameraState.UP]
    assert h.frames[0].image.shape == (40, 50, 3) and h.frames[0].seq == 2  # seq 1 was the dropped frame
    assert h.metric("frames_dropped_total", reason="roi") == 1 and h.accounted()


def test_a_roi_that_sticks_out_of_the_frame_is_clipped_and_logged_once(caplog):
    src = FakeSource([Session(frames=1000)])
    with caplog.at_level(logging.INFO, logger="inspectd.sources"), Harness(src, roi=(150, 100, 50, 50)) as h:
        wait_until(lambda: len(h.frames) >= 10, 10, "ten frames")
    assert h.frames[0].image.shape == (20, 10, 3)
    warnings = _records(caplog, logging.WARNING)
    assert warnings == ["camera roi: roi [150, 100, 50, 50] extends past the 160x120 frame; cropping [150, 100, 10, 20]"]
    assert h.metric("frames_dropped_total", reason="roi") == 0


# ----------------------------------------------------------------------------- backoff


@pytest.fixture()
def attempts(monkeypatch) -> list[int]:
    """The attempt numbers the worker asks backoff_delay for (each answered with a short delay)."""
    seen: list[int] = []

    def record(attempt, initial, maximum, *args, **kw):
        seen.append(attempt)
        return 0.01

    monkeypatch.setattr(camera, "backoff_delay", record)
    return seen


def test_an_up_followed_by_an_immediate_failure_does_not_reset_the_backoff(attempts):
    """The flapping camera: UP at its first frame, DOWN right after. The backoff keeps growing."""
    src = FakeSource([Session(frames=1, end=SourceError("connection reset"))])
    with Harness(src) as h:
        wait_until(lambda: len(attempts) >= 6, 10, "six reconnects")
    assert attempts[:6] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in h.states][:4] == [CameraState.UP, CameraState.DOWN, CameraState.UP, CameraState.DOWN]


def test_the_backoff_resets_after_frames_flowed_for_a_while(attempts, monkeypatch):
    monkeypatch.setattr(camera, "STABLE_AFTER_S", 0.1)
    fail = SourceError("connection refused")
    # Two failed opens, then a session streaming for ~0.25 s (50 frames x 5 ms), then failed opens again.
    src = FakeSource([fail, fail, Session(frames=50, end=SourceError("connection reset")), fail])
    with Harness(src):
        wait_until(lambda: len(attempts) >= 5, 10, "five reconnects")
    assert attempts[:5] == [0, 1, 0, 1, 2]
