"""The live view's pictures: each camera's latest inference result, rendered only while someone watches.

    live = LiveView(max_fps=5, width=640).start()
    pipeline = Pipeline(..., observer=live.offer)   # the inference thread hands over each result: O(1)
    for jpeg in live.stream("line1-top", stop):      # an HTTP viewer (MJPEG): a new picture at most max_fps
        ...
    live.stop()

`offer` only keeps a reference to the newest (frame, score, CAM) of each camera: inference never
waits for, and never pays for, the live view. The render thread draws a camera's picture (the frame,
the map blended in: relative to the frame's mask threshold by default, the mask's contours and the
regions' boxes, score and verdict, the
map's colour legend: `inspectd.drawing.draw`, as `inspectd infer` and `watch --save` draw) only
while a viewer streams that camera, at most `max_fps` times a second, once for all its viewers, at
most `width` pixels wide, at a lower CPU priority than inference, and at most SATURATED_FPS while
inspection cannot keep up with the cameras.
"""

from __future__ import annotations

__all__ = ["LiveView", "Seen", "render", "placeholder", "KEEPALIVE_S", "SNAPSHOT_LEASE_S"]

import functools
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

from inspectd.drawing import SIGMOID_JET, draw, map_index
from inspectd.frames import Frame
from inspectd.imageio import encode_jpeg
from inspectd.pipeline.postprocess import InspectOptions
from inspectd.threads import name_this_thread

log = logging.getLogger("inspectd.outputs.live")

# A stream with nothing new sends its last picture again this often: a viewer that went away is noticed
# (the write fails) and its thread freed, and a camera that is down still shows its last picture.
KEEPALIVE_S = 2.0
# A camera whose picture was asked for as a snapshot is drawn for this long after (the page refreshes sooner).
SNAPSHOT_LEASE_S = 3.0
# While inspection is saturated (frames replaced before the model could take them), pictures are drawn at
# most this often: every cycle the view takes then comes out of inspection (docs/performance.md#the-live-view).
SATURATED_FPS = 1.0
_JPEG_QUALITY = 80
# The render thread's nice value: with the CPU saturated, inference (nice 0) goes first.
_NICE = 10


@dataclass(frozen=True, eq=False)
class Seen:
    """A camera's newest inference result, as the pipeline had it (references, nothing copied)."""

    frame: Frame
    score: float
    cam_logits: np.ndarray
    options: InspectOptions

    @property
    def is_defect(self) -> bool:
        return self.score >= self.options.threshold


@dataclass(frozen=True, eq=False)
class Picture:
    """One rendered picture of a camera: `number` counts up with each new one."""

    number: int
    jpeg: bytes
    seen: Seen  # what it shows


def render(seen: Seen, width: int, mode: str = "relative") -> bytes:
    """The live picture of one result as JPEG: the frame scaled to at most `width`, the map blended in (`mode`, a
    MAP_MODES entry of inspectd.drawing), the mask's contours and the regions' boxes when judged defective, score
    and verdict, the legend (`inspectd.drawing.draw`, as infer and watch draw). Everything is scaled down first
    and the map coloured straight from the logits, so a picture costs about a dozen OpenCV calls, each of which
    lets go of the GIL (docs/performance.md). The mask is the published one's rule at the picture's size: logits
    upsampled bilinearly, at or above the frame's logit threshold (`MaskRule.logit_threshold`)."""
    image = seen.frame.image
    h, w = image.shape[:2]
    if w > width:
        w, h = width, max(1, round(h * width / w))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    logits = cv2.resize(np.asarray(seen.cam_logits, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    cut = seen.options.mask_rule.logit_threshold(seen.cam_logits)
    mask, boxes = _regions(logits, seen, cut, (w / seen.frame.width) ** 2) if seen.is_defect else (None, [])
    picture = draw(
        cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
        map_index(logits, mode, cut, seen.is_defect),
        SIGMOID_JET,
        mask=mask,
        boxes=boxes,
        verdict=(seen.score, seen.options.threshold),
        legend=mode,
    )
    return encode_jpeg(picture, _JPEG_QUALITY, rgb=False)


def _regions(logits: np.ndarray, seen: Seen, t: float, area_scale: float) -> tuple[np.ndarray | None, list]:
    """(the mask to outline, the regions' boxes): the components of logits >= the frame's threshold `t` with at
    least min_region_px pixels (scaled to the picture), as `postprocess.locate` finds them."""
    if t == float("inf"):
        return None, []
    above = cv2.compare(logits, float(t), cv2.CMP_GE)  # type: ignore[call-overload]  # a scalar src2 works; stubs want arrays
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= max(1.0, seen.options.min_region_px * area_scale)
    keep[0] = False  # the background
    if not keep.any():
        return None, []
    return keep[labels], [tuple(box) for box in stats[keep][:, :4]]


@functools.lru_cache(maxsize=4)
def placeholder(text: str, width: int = 320, height: int = 240) -> bytes:
    """A grey picture saying `text` (a camera with no frame yet)."""
    image = np.full((height, width, 3), 64, np.uint8)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
    cv2.putText(
        image, text, ((width - tw) // 2, (height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (220, 220, 220), 1, cv2.LINE_AA
    )
    return encode_jpeg(image, _JPEG_QUALITY)


class LiveView:
    """The newest result per camera (`offer`), and pictures of it for the cameras someone watches."""

    def __init__(
        self, max_fps: float = 5.0, width: int = 640, saturated: Callable[[], bool] = lambda: False, map_mode: str = "relative"
    ):
        """`saturated()`: inspection cannot keep up right now; pictures are then drawn at SATURATED_FPS at most.
        `map_mode`: the map blended in (inspectd.drawing.MAP_MODES)."""
        self.max_fps = max_fps
        self.width = width
        self.map_mode = map_mode
        self.saturated = saturated
        self._latest: dict[str, Seen] = {}  # written by the inference thread only; a dict store is atomic
        self._cameras: set[str] = set()  # the cameras running now (add/forget): offers of others are ignored
        self._leases: dict[str, float] = {}  # camera -> monotonic time until which a snapshot viewer counts
        self._pictures: dict[str, Picture] = {}
        self._viewers: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the render thread's: viewers coming and going, stop
        # Each watched camera's: a new picture wakes only the streams of that camera.
        self._drawn: dict[str, threading.Condition] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-render", daemon=True)
        self.renders = 0  # pictures drawn since start (tests, the benchmark)

    # -- the pipeline's side -------------------------------------------------------------------
    def offer(self, frame: Frame, score: float, cam_logits: np.ndarray, options: InspectOptions) -> None:
        """The inference thread's newest result of a camera: kept by reference, nothing else (never blocks).
        A camera not running (removed while its frame was in the model) is ignored."""
        if frame.camera in self._cameras:
            self._latest[frame.camera] = Seen(frame, float(score), cam_logits, options)

    def add(self, camera: str) -> None:
        """A camera started: its results are kept from now on."""
        with self._lock:
            self._cameras.add(camera)

    def forget(self, camera: str) -> None:
        """A camera removed (reload): its results and pictures go, and its streams end."""
        with self._lock:
            self._cameras.discard(camera)
            self._latest.pop(camera, None)
            self._pictures.pop(camera, None)
            if camera in self._drawn:
                self._drawn[camera].notify_all()

    def latest(self, camera: str) -> Seen | None:
        return self._latest.get(camera)

    def shown(self, camera: str) -> Seen | None:
        """What a viewer of `camera` sees: the result of its last picture (the newest result if none is drawn)."""
        with self._lock:
            picture = self._pictures.get(camera)
        return picture.seen if picture is not None else self._latest.get(camera)

    def snapshot(self, camera: str) -> bytes:
        """The camera's current picture as one JPEG (the placeholder before the first), and a lease: the camera
        counts as watched for SNAPSHOT_LEASE_S, so that a page refreshing it gets new pictures."""
        with self._lock:
            self._leases[camera] = time.monotonic() + SNAPSHOT_LEASE_S
            picture = self._pictures.get(camera)
            self._changed.notify_all()
        return picture.jpeg if picture is not None else placeholder("waiting for a frame")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LiveView:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
            for drawn in self._drawn.values():
                drawn.notify_all()
        self._thread.join(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- viewers ---------------------------------------------------------------------------
    @contextmanager
    def watching(self, camera: str) -> Iterator[threading.Condition]:
        """Count a viewer of `camera` while inside; yields the condition its new pictures are announced on."""
        with self._lock:
            self._viewers[camera] += 1
            drawn = self._drawn.setdefault(camera, threading.Condition(self._lock))
            self._changed.notify_all()
        try:
            yield drawn
        finally:
            with self._lock:
                self._viewers[camera] -= 1
                if self._viewers[camera] <= 0:
                    del self._viewers[camera]
                    del self._drawn[camera]

    def viewers(self) -> int:
        with self._lock:
            return sum(self._viewers.values())

    def stream(self, camera: str, until: threading.Event | None = None) -> Generator[bytes, None, None]:
        """JPEG pictures of `camera` as they are drawn (each once), the last one again after KEEPALIVE_S
        without a new one, a placeholder until the first; ends at stop() or when `until` is set."""
        with self.watching(camera) as drawn:
            number, last = -1, placeholder("waiting for a frame")
            while not self._stop.is_set() and not (until is not None and until.is_set()) and camera in self._cameras:
                with self._lock:
                    drawn.wait_for(functools.partial(self._newer, camera, number), timeout=KEEPALIVE_S)
                    picture = self._pictures.get(camera)
                if picture is not None and picture.number != number:
                    number, last = picture.number, picture.jpeg
                if not self._stop.is_set():
                    yield last

    def _newer(self, camera: str, number: int) -> bool:
        picture = self._pictures.get(camera)
        return self._stop.is_set() or camera not in self._cameras or (picture is not None and picture.number != number)

    # -- the render thread -----------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread("live-render")
        try:  # Linux: a thread's own nice value (setpriority on its thread id)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        except (OSError, AttributeError):
            pass
        while not self._stop.is_set():
            with self._changed:
                self._changed.wait_for(lambda: self._viewers or self._leases or self._stop.is_set(), timeout=1.0)
                now = time.monotonic()
                self._leases = {c: until for c, until in self._leases.items() if until > now}
                watched = sorted(set(self._viewers) | set(self._leases))
            started = time.monotonic()
            for camera in watched:
                self._render(camera)
            # Each watched camera at most once per period: a render that took longer waits less.
            period = 1.0 / (min(self.max_fps, SATURATED_FPS) if self._saturated() else self.max_fps)
            self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    def _saturated(self) -> bool:
        try:
            return bool(self.saturated())
        except Exception:  # a failing probe must not stop the pictures
            return False

    def _render(self, camera: str) -> None:
        seen = self._latest.get(camera)
        drawn = self._pictures.get(camera)
        if seen is None or (drawn is not None and drawn.seen is seen):
            return  # nothing new since the last picture
        try:
            jpeg = render(seen, self.width, self.map_mode)
        except Exception:  # a picture is not worth the thread: say so, go on with the next
            log.exception("live view: cannot draw camera %s frame %d", camera, seen.frame.seq)
            return
        self.renders += 1
        with self._lock:
            if camera in self._latest:  # not forgotten meanwhile
                self._pictures[camera] = Picture((drawn.number + 1) if drawn else 0, jpeg, seen)
            if camera in self._drawn:
                self._drawn[camera].notify_all()
