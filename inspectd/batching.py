"""Latest-frame slots per camera and the cross-camera batcher.

Each camera owns one slot: a new frame replaces the old one, and a frame replaced before it was
inferred is dropped as `stale` (counted). The batcher takes up to `max_batch` frames, at most
one per camera, in round-robin order so no camera starves, waiting at most `max_wait_ms` after
the first frame. Latency therefore never grows with load: when inference is slower than the
cameras, frames are dropped, never queued.
"""

from __future__ import annotations

__all__ = ["FrameBoard", "Batcher", "buckets_for"]

import logging
import threading
import time
from collections.abc import Callable

from inspectd.frames import Batch, Frame

log = logging.getLogger("inspectd.batching")


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes compiled at warm-up: powers of two below max_batch, and max_batch itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class FrameBoard:
    """One slot per camera and one condition the batcher waits on.

    >>> board = FrameBoard(on_stale=lambda frame: ...)
    >>> board.put(frame)          # from a capture thread; never blocks for long
    >>> board.take(["a", "b"], 4)  # from the batcher
    """

    def __init__(self, on_stale: Callable[[Frame], None] = lambda frame: None):
        self._slots: dict[str, Frame] = {}
        self._cond = threading.Condition()
        self._on_stale = on_stale

    def put(self, frame: Frame) -> None:
        with self._cond:
            old = self._slots.get(frame.camera)
            self._slots[frame.camera] = frame
            self._cond.notify()
        if old is not None:
            self._on_stale(old)

    def wait(self, min_frames: int, timeout: float) -> bool:
        """Wait until at least `min_frames` slots hold a frame (or timeout); True if they do."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._slots) >= min_frames, timeout=max(0.0, timeout))

    def wake(self) -> None:
        """Wake a waiting batcher (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, order: list[str], limit: int) -> list[Frame]:
        """Remove and return up to `limit` frames, visiting cameras in `order`."""
        with self._cond:
            taken = [self._slots.pop(cam) for cam in order if cam in self._slots][:limit]
            # Frames beyond the limit stay: they were not taken, so they are not stale yet.
            return taken

    def cameras(self) -> list[str]:
        with self._cond:
            return list(self._slots)

    def drop(self, camera: str) -> None:
        """Forget a camera's pending frame (camera removed)."""
        with self._cond:
            self._slots.pop(camera, None)


class Batcher:
    """Forms batches from the board and hands them to `process` on its own thread (the inference thread).

    `process(batch)` runs the model; while it runs, cameras keep replacing their slots, so the next
    batch holds the newest frames.
    """

    def __init__(self, board: FrameBoard, max_batch: int, max_wait_ms: float, process: Callable[[Batch], None]):
        self.board = board
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._process = process
        self._stop = threading.Event()
        self._rr: list[str] = []  # round-robin order of cameras
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.heartbeat_mono = time.monotonic()  # loop liveness, for the watchdog
        self.busy_since: float | None = None  # set while inside process(): a hung inference shows here

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in flight (if any) has been processed."""
        self._stop.set()
        self.board.wake()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _order(self) -> list[str]:
        for cam in self.board.cameras():
            if cam not in self._rr:
                self._rr.append(cam)
        return list(self._rr)

    def _rotate(self, taken: list[Frame]) -> None:
        """Cameras just served go to the back of the queue (round robin)."""
        served = {f.camera for f in taken}
        self._rr = [c for c in self._rr if c not in served] + [f.camera for f in taken]

    def next_batch(self) -> Batch | None:
        """Wait for the first frame, then up to max_wait for more (or a full batch)."""
        if not self.board.wait(1, 0.2):
            return None
        order = self._order()
        # A batch can hold one frame per camera: with fewer cameras than max_batch, waiting for
        # max_batch frames would only add max_wait to every batch.
        target = min(self.max_batch, len(order))
        deadline = time.monotonic() + self.max_wait_s
        self.board.wait(target, deadline - time.monotonic())
        taken = self.board.take(self._order(), self.max_batch)
        if not taken:
            return None
        self._rotate(taken)
        return Batch(tuple(taken), time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat_mono = time.monotonic()
            batch = self.next_batch()
            if batch is None:
                continue
            self.busy_since = time.monotonic()
            try:
                self._process(batch)
            except Exception:
                log.exception("inference failed for a batch of %d frame(s); continuing", len(batch.frames))
            finally:
                self.busy_since = None
