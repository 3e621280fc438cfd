"""The camera worker: one thread per camera that reads frames and hands each to a sink, forever.

It reconnects on any SourceError and on a stall (no new frame for `stall_timeout_s`), waiting a
capped exponential backoff with jitter between attempts (it starts again from the shortest delay
only after frames flowed for STABLE_AFTER_S); a camera that is down at start-up just keeps
retrying. A roi outside the frame (RoiError) is a configuration problem: the camera stays DOWN,
one ERROR says why, and the frame is looked at again every reconnect_max_s. Nothing raises out of
the thread: every failure is logged (logger "inspectd.sources", with the camera id, credentials
redacted) and reported as a state change.

States (CameraState): STARTING -> UP | DOWN; UP -> DOWN; DOWN -> UP; any -> STOPPED. UP means "a
frame (that the roi fits) arrived since the last (re)connect" (for a camera triggered from outside, which
sends nothing until asked: "open and acquiring"); every transition sets `inspectd_camera_up` and calls
`on_state(camera, state, detail)` (under the worker's lock, so callbacks arrive in order: keep them
short and non-blocking).
"""

from __future__ import annotations

__all__ = [
    "CameraWorker",
    "RoiError",
    "backoff_delay",
    "crop_roi",
    "roi_box",
    "resize_frame",
    "RateLimiter",
    "READ_SLICE_S",
    "STABLE_AFTER_S",
]

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np

from inspectd.config import CameraConfig
from inspectd.frames import CameraState, DropReason, Frame, PartTag, lost_frame
from inspectd.metrics import Metrics
from inspectd.sources.base import DecodeError, EndOfStream, Skipped, Source, SourceError, Trigger, frame_period, redact
from inspectd.sources.registry import open_source

log = logging.getLogger("inspectd.sources")

READ_SLICE_S = 0.2  # longest wait inside one read(): stop requests and stalls are checked between reads
WAIT_SLICE_S = 0.2  # heartbeat period while backing off or idle
JITTER = 0.2  # reconnect delays are stretched by up to 20 % so that cameras of a line do not retry in step
# The backoff starts again from reconnect_initial_s only after a session delivered frames for this long:
# a camera that comes UP and fails at once keeps backing off instead of flapping twice a second.
STABLE_AFTER_S = 5.0

_ALLOWED = {
    CameraState.STARTING: {CameraState.UP, CameraState.DOWN, CameraState.STOPPED},
    CameraState.UP: {CameraState.DOWN, CameraState.STOPPED},
    CameraState.DOWN: {CameraState.UP, CameraState.STOPPED},
    CameraState.STOPPED: set(),
}


def backoff_delay(
    attempt: int, initial: float, maximum: float, jitter: float = JITTER, rand: Callable[[], float] = random.random
) -> float:
    """Delay before reconnect attempt `attempt` (0-based): initial * 2**attempt capped at maximum, plus jitter.

    The result lies in [base, base * (1 + jitter)]; `rand` returns a float in [0, 1).
    """
    base = min(maximum, initial * 2.0 ** min(attempt, 64))
    return base * (1.0 + jitter * rand())


class RoiError(SourceError):
    """The camera's roi lies outside its frames: a configuration problem, not a camera failure.

    The worker holds the camera DOWN, logs it once as an ERROR and looks again every reconnect_max_s.
    """


def roi_box(roi: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """[x, y, w, h] clipped to a width x height frame, as (x0, y0, x1, y1); RoiError if nothing is left."""
    x, y, w, h = roi
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise RoiError(f"roi {list(roi)} lies outside the {width}x{height} frame")
    return x0, y0, x1, y1


def crop_roi(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop [x, y, w, h] (clipped to the frame) into a contiguous copy; RoiError if nothing is left."""
    if roi is None:
        return image
    x0, y0, x1, y1 = roi_box(roi, image.shape[1], image.shape[0])
    # A copy, not a view: a view would keep the whole frame alive downstream.
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def resize_frame(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize to (width, height) on the capture thread (INTER_AREA: the right filter for shrinking).

    Smaller frames cost less memory, post-processing and mask encoding downstream; event
    coordinates are then in the resized frame's pixels.
    """
    if size is None or (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA)


class RateLimiter:
    """`fps_limit`: lets at most `fps` frames per second through, on a fixed grid (0 = everything)."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._due = float("-inf")

    @property
    def due(self) -> float:
        """The monotonic time before which a frame would be refused (-inf: the next one passes)."""
        return self._due if self.period else float("-inf")

    def allow(self, now: float) -> bool:
        if now < self._due:
            return False
        # On time: keep the grid (a 30 fps camera limited to 10 gives 10, not 7.5). After a gap the
        # grid restarts at `now` instead of letting a burst through to catch up.
        first = self._due == float("-inf")
        self._due = now + self.period if first else max(self._due + self.period, now + self.period / 2)
        return True


class CameraWorker:
    """Runs one camera in a thread named `capture:{camera}`; frames go to `sink`, never into a queue.

    >>> w = CameraWorker(cfg, sink=slot.put, metrics=Metrics(CollectorRegistry()))
    >>> w.start(); w.state               # CameraState.STARTING, then UP / DOWN
    >>> w.stop(); w.join(2.0)            # True once the thread has ended
    """

    def __init__(
        self,
        cfg: CameraConfig,
        sink: Callable[[Frame], None],
        metrics: Metrics,
        on_state: Callable[[str, CameraState, str], None] = lambda cam, state, detail: None,
        source_factory: Callable[[CameraConfig], Source] | None = None,
        lost: Callable[[Frame, DropReason], None] = lambda frame, reason: None,
        max_triggers: int = 64,
    ):
        """In part mode (cfg.mode "parts") every frame carries a PartTag; a part whose image never becomes a
        frame (undecodable, roi outside it, its crop failed) goes to `lost` as a Frame with a 0x0 image."""
        if source_factory is None:
            source_factory = open_source
        self.cfg = cfg
        self._sink, self._on_state, self._factory, self._lost = sink, on_state, source_factory, lost
        self._source: Source | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._state = CameraState.STARTING
        self._thread = threading.Thread(target=self._run, name=f"capture:{cfg.id}", daemon=True)
        self._seq = 0
        self._attempt = 0  # failed attempts since frames last flowed for STABLE_AFTER_S: drives the backoff
        self._streaming_since: float | None = None  # first frame of the current session
        self._roi_frame: tuple[int, int] | None = None  # the frame size the roi was last checked against
        self._roi_reported: str | None = None  # the roi error last logged as an ERROR (until the camera is UP)
        self._limiter = RateLimiter(cfg.fps_limit)
        # Parts asked for from outside (`trigger`, any thread) until this thread fires them (a source with `fire`)
        # or names its next frames with them (any other source).
        self._asked: deque[Trigger] = deque()
        self._asked_lock = threading.Lock()
        self._max_triggers = max_triggers
        self._tags: deque[Trigger] = deque()
        self.last_frame_mono: float | None = None
        self.heartbeat_mono: float = time.monotonic()
        cam = cfg.id
        self._m_captured = metrics.frames_captured.labels(camera=cam)
        self._m_fps_drop = metrics.frames_dropped.labels(camera=cam, reason=DropReason.FPS_LIMIT.value)
        self._m_drops = metrics.frames_dropped
        # Exported from 0 (the dashboard divides by captured + decode drops): by reason as they happen otherwise.
        metrics.frames_dropped.labels(camera=cam, reason=DropReason.DECODE.value)
        self._m_roi_drop = metrics.frames_dropped.labels(camera=cam, reason=DropReason.ROI.value)
        self._m_error_drop = metrics.frames_dropped.labels(camera=cam, reason=DropReason.ERROR.value)
        self._m_up = metrics.camera_up.labels(camera=cam)
        self._m_reconnects = metrics.camera_reconnects.labels(camera=cam)

    @property
    def state(self) -> CameraState:
        return self._state

    @property
    def source(self) -> Source | None:
        """The camera's Source once built (tests read e.g. SyntheticSource.last_mask through it)."""
        return self._source

    def trigger(self, part_id: str, at: float | None = None) -> str | None:
        """A part asked for at wall time `at` (now; the trigger endpoint, any thread): fired at the camera, or the
        name of its next frame. None when accepted, else why not (one line)."""
        if self.cfg.mode != "parts":
            return f'camera {self.cfg.id} is not in part mode (mode = "parts")'
        with self._asked_lock:
            if len(self._asked) >= self._max_triggers:
                return f"camera {self.cfg.id}: {self._max_triggers} triggers already waiting (busy)"
            self._asked.append(Trigger(time.time() if at is None else at, time.monotonic(), part_id))
        return None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._m_up.set(0)  # the series exists (and alerts can fire) before the first connect
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it closes the source); returns at once. The state is STOPPED from now on."""
        self._stop.set()
        self._transition(CameraState.STOPPED, "stopped")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ----------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                error = self._session()
                if error is None or self._stop.is_set():
                    break
                delay = self._next_delay(error)
                self._report_down(error, delay)
                if isinstance(error, EndOfStream):
                    self._wait(float("inf"))  # a finished file/folder stays finished until stop()
                elif self._wait(delay):
                    self._m_reconnects.inc()
        except BaseException:  # a bug in the worker itself: say so; the stalled heartbeat tells the watchdog
            log.exception("camera %s: capture thread crashed", self.cfg.id)
        finally:
            self._close()
            self._transition(CameraState.STOPPED, "stopped")

    def _next_delay(self, error: Exception) -> float:
        """Wait before the next attempt: reconnect_max_s for a bad roi, else the backoff (reset by a stable session)."""
        if isinstance(error, RoiError):
            return self.cfg.reconnect_max_s
        if (
            self._streaming_since is not None
            and self.last_frame_mono is not None
            and self.last_frame_mono - self._streaming_since >= STABLE_AFTER_S
        ):
            self._attempt = 0
        delay = backoff_delay(self._attempt, self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        self._attempt += 1
        return delay

    def _session(self) -> Exception | None:
        """One connection: open, stream until failure or stop, close. Returns the failure (None: stopped)."""
        self._streaming_since = None
        try:
            if self._source is None:
                self._source = self._factory(self.cfg)
            self._source.open()
            if getattr(self._source, "waits_for_triggers", False) and self._transition(CameraState.UP, "waiting for triggers"):
                # A camera triggered from outside sends nothing until asked: open and acquiring is UP.
                log.info("camera %s: up (waiting for triggers)", self.cfg.id)
            self._stream(self._source)
            return None
        except SourceError as exc:
            return exc
        except Exception as exc:  # a bug in a source or in the sink: log the traceback, then reconnect
            log.exception("camera %s: unexpected error", self.cfg.id)
            return exc
        finally:
            self._abandoned()
            self._close()

    def _abandoned(self) -> None:
        """Triggers the session fired whose images will never come (a triggered camera that failed or stopped):
        each a frame captured and dropped (`camera`; `shutdown` when stopping), in part mode a not_inspected part."""
        abandon = getattr(self._source, "abandon", None)
        fired = abandon() if abandon is not None else []
        with self._asked_lock:
            asked, self._asked = list(self._asked), deque()
        tags, self._tags = list(self._tags), deque()
        reason = DropReason.SHUTDOWN if self._stop.is_set() else DropReason.CAMERA
        for trigger in [*fired, *tags, *asked]:
            self._seq += 1
            self._m_captured.inc()
            self._m_drops.labels(camera=self.cfg.id, reason=reason.value).inc()
            # Its time is the trigger's: the verdict's latency says how long the line waited for it.
            tag = self._part_tag(trigger.mono, part_id=trigger.part_id or str(self._seq), trigger_at=trigger.at)
            if tag is not None:
                self._lost(lost_frame(self.cfg.id, self._seq, tag, trigger.at, trigger.mono), reason)

    def _serve_triggers(self, source: Source) -> None:
        """Parts asked for since the last read: fired at the camera (SourceError if it refuses: the session
        ends and `_abandoned` hands them on), or kept to name the next frames."""
        if not self._asked:  # every read: skip the lock when nothing was asked (a trigger now is seen next read)
            return
        with self._asked_lock:
            asked, self._asked = list(self._asked), deque()
        fire = getattr(source, "fire", None)
        for i, trigger in enumerate(asked):
            if fire is None:
                self._tags.append(trigger)
                continue
            try:
                fire(trigger)
            except SourceError:
                with self._asked_lock:  # the ones not fired yet: lost with the session
                    self._asked.extendleft(reversed(asked[i + 1 :]))
                raise

    def _stream(self, source: Source) -> None:
        """Read `source` (open) until stop(); raise SourceError on a read failure or a stall."""
        last_new = time.monotonic()  # the stall clock starts at open
        stall_s = max(self.cfg.stall_timeout_s, 2 * frame_period(source))
        heard = False  # anything read this session, a frame or an undecodable one
        while not self._stop.is_set():
            self.heartbeat_mono = time.monotonic()
            self._serve_triggers(source)
            try:
                # Frames over fps_limit are skipped unconverted only while UP: the first frame of a session
                # is always looked at (state, roi), whatever the limiter's grid from the session before.
                skip_before = self._limiter.due if self._state is CameraState.UP else float("-inf")
                image = source.read(READ_SLICE_S, skip_before)
            except DecodeError as exc:  # one bad frame, not a bad camera: captured, and dropped as such
                heard = True
                self._seq += 1
                self._m_captured.inc()
                self._m_drops.labels(camera=self.cfg.id, reason=exc.reason.value).inc()
                self._part_lost(time.monotonic(), exc.reason)
                if not exc.repeated:  # a bad file of a looping folder is logged once, counted every pass
                    log.warning("camera %s: frame dropped: %s", self.cfg.id, redact(str(exc)))
                image = None
            now = time.monotonic()
            if isinstance(image, Skipped):  # SKIPPED: arrived, not converted: over fps_limit
                heard, last_new = True, now
                self._on_skipped(now)
            elif image is not None:
                heard, last_new = True, now
                self._on_frame(image, now)
            elif now - last_new > stall_s:
                if not heard:  # connected (or connecting) and nothing ever came: say so
                    raise SourceError(f"no frame within {now - last_new:.1f} s of opening (not answering?)")
                raise SourceError(f"stalled: no frame for {now - last_new:.1f} s")

    def _on_frame(self, image: np.ndarray, now: float) -> None:
        wall = time.time()
        self._seq += 1
        self._m_captured.inc()
        self.last_frame_mono = now
        try:
            self._check_roi(image)  # before UP: a roi outside the frame holds the camera DOWN
        except RoiError:
            self._part_lost(now, DropReason.ROI, wall)
            raise
        if self._streaming_since is None:
            self._streaming_since = now
        if self._state is not CameraState.UP and self._transition(CameraState.UP, "receiving frames"):
            self._roi_reported = None
            log.info("camera %s: up (%dx%d)", self.cfg.id, image.shape[1], image.shape[0])
        if not self._limiter.allow(now):
            self._m_fps_drop.inc()
            return
        try:
            image = resize_frame(crop_roi(image, self.cfg.roi), self.cfg.resize)
        except Exception:  # counted before the session ends, so the frame is not lost uncounted
            self._m_error_drop.inc()
            self._part_lost(now, DropReason.ERROR, wall)
            raise
        self._sink(Frame(self.cfg.id, self._seq, wall, now, image, self._part_tag(now)))

    def _part_tag(self, now: float, part_id: str | None = None, trigger_at: float | None = None) -> PartTag | None:
        """Part mode: the frame just read is a part; its id is the source's (a file name, a camera's frame id)
        or else its capture number."""
        if self.cfg.mode != "parts":
            return None
        if part_id is None and self._tags:  # a source that cannot fire: its next frame is the part asked for
            tag = self._tags.popleft()
            part_id, trigger_at = tag.part_id, tag.at
        part_id = part_id or getattr(self._source, "part_id", None) or str(self._seq)
        trigger_at = trigger_at if trigger_at is not None else getattr(self._source, "trigger_at", None)
        return PartTag(str(part_id), now + self.cfg.deadline_ms / 1000.0, trigger_at)

    def _part_lost(self, now: float, reason: DropReason, wall: float | None = None) -> None:
        """Part mode: the part just read has no image to inspect: it ends not_inspected (`reason`)."""
        tag = self._part_tag(now)
        if tag is not None:
            self._lost(lost_frame(self.cfg.id, self._seq, tag, time.time() if wall is None else wall, now), reason)

    def _on_skipped(self, now: float) -> None:
        """A frame the source did not convert because fps_limit drops it: captured, and dropped as such."""
        self._seq += 1
        self._m_captured.inc()
        self._m_fps_drop.inc()
        self.last_frame_mono = now

    def _check_roi(self, image: np.ndarray) -> None:
        """RoiError (the frame counted as a roi drop) if the roi misses the frame; a clipped roi is logged once."""
        if self.cfg.roi is None:
            return
        height, width = image.shape[:2]
        try:
            x0, y0, x1, y1 = roi_box(self.cfg.roi, width, height)
        except RoiError:
            self._m_roi_drop.inc()
            raise
        if self._roi_frame != (width, height):
            self._roi_frame = (width, height)
            if (x1 - x0, y1 - y0) != tuple(self.cfg.roi[2:]):
                log.warning(
                    "camera %s: roi %s extends past the %dx%d frame; cropping [%d, %d, %d, %d]",
                    self.cfg.id,
                    list(self.cfg.roi),
                    width,
                    height,
                    x0,
                    y0,
                    x1 - x0,
                    y1 - y0,
                )

    def _report_down(self, error: Exception, delay: float) -> None:
        detail = redact(str(error) or type(error).__name__)
        if isinstance(error, RoiError):
            # A configuration problem: one ERROR (per frame size) while it lasts, not one per retry.
            self._transition(CameraState.DOWN, detail)
            first, self._roi_reported = detail != self._roi_reported, detail
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "camera %s: %s: fix this camera's roi in the config; the camera stays down (checked again every %.1f s)",
                self.cfg.id,
                detail,
                delay,
            )
            return
        if isinstance(error, EndOfStream):
            self._transition(CameraState.DOWN, detail)
            log.info("camera %s: %s", self.cfg.id, detail)
            return
        first = self._transition(CameraState.DOWN, detail)
        # The first failure of an outage is a warning; the retries of a camera known to be down are not.
        log.log(logging.WARNING if first else logging.INFO, "camera %s: %s; reconnecting in %.1f s", self.cfg.id, detail, delay)

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds` unless stopped (returns False then); keeps the heartbeat going meanwhile. Parts asked
        for meanwhile cannot be had: the camera is down (`camera`)."""
        deadline = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            self.heartbeat_mono = now
            self._abandoned()
            if now >= deadline:
                return True
            if self._stop.wait(min(WAIT_SLICE_S, deadline - now)):
                return False

    def _close(self) -> None:
        if self._source is None:
            return
        try:
            self._source.close()
        except Exception:
            log.exception("camera %s: closing the source failed", self.cfg.id)

    def _transition(self, state: CameraState, detail: str) -> bool:
        """Move to `state` if allowed (False otherwise); set camera_up and tell on_state, in order."""
        with self._lock:
            if state not in _ALLOWED[self._state]:
                return False
            self._state = state
            self._m_up.set(1 if state is CameraState.UP else 0)
            try:
                self._on_state(self.cfg.id, state, detail)
            except Exception:
                log.exception("camera %s: on_state callback failed", self.cfg.id)
            return True
