"""Latest-frame slots per camera and the cross-camera batcher.

Each camera owns one slot: a new frame replaces the old one, and a frame replaced before it was
inferred is dropped as `stale` (counted). The batcher takes up to the batch limit of frames, at
most one per camera, in round-robin order so no camera starves, waiting at most `max_wait_ms`
after the first frame. Latency therefore never grows with load: when inference is slower than
the cameras, frames are dropped, never queued. Frames left waiting never vanish: the board hands
every frame it drops to `on_drop(frame, reason)`.
"""

from __future__ import annotations

__all__ = ["FrameBoard", "Batcher", "buckets_for"]

import threading
import time
from collections.abc import Callable

from inspectd.frames import Batch, DropReason, Frame


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes compiled at warm-up: powers of two below max_batch, and max_batch itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


class FrameBoard:
    """One slot per camera and one condition the batcher waits on. Every frame that leaves it unrun
    is handed to `on_drop(frame, reason)`, so no frame disappears uncounted.

    >>> board = FrameBoard(on_drop=lambda frame, reason: ...)
    >>> board.put(frame)           # from a capture thread; never blocks for long
    >>> board.take(["a", "b"], 4)  # from the batcher
    >>> board.close()              # at shutdown: waiting frames -> on_drop(frame, "shutdown")
    """

    def __init__(self, on_drop: Callable[[Frame, DropReason], None] = lambda frame, reason: None):
        self._slots: dict[str, Frame] = {}
        self._cond = threading.Condition()
        self._on_drop = on_drop
        self._closed = False

    def put(self, frame: Frame) -> None:
        """Replace the camera's waiting frame (the old one is dropped as `stale`)."""
        old: Frame | None
        with self._cond:
            closed = self._closed
            if closed:
                old = frame  # a capture thread that outlived shutdown
            else:
                old = self._slots.get(frame.camera)
                self._slots[frame.camera] = frame
                self._cond.notify()
        if old is not None:
            self._on_drop(old, DropReason.SHUTDOWN if closed else DropReason.STALE)

    def wait(self, min_frames: int, timeout: float) -> bool:
        """Wait until at least `min_frames` slots hold a frame (or timeout, or close); True if they do."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: self._closed or len(self._slots) >= min_frames, timeout=max(0.0, timeout))
                and not self._closed
            )

    def wake(self) -> None:
        """Wake a waiting batcher (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, order: list[str], limit: int) -> list[Frame]:
        """Remove and return up to `limit` frames, visiting cameras in `order`; the others stay waiting."""
        with self._cond:
            chosen = [cam for cam in order if cam in self._slots][:limit]
            return [self._slots.pop(cam) for cam in chosen]

    def cameras(self) -> list[str]:
        """Cameras with a frame waiting."""
        with self._cond:
            return list(self._slots)

    def drop(self, camera: str, reason: DropReason = DropReason.SHUTDOWN) -> None:
        """Drop a camera's waiting frame (camera stopped or removed)."""
        with self._cond:
            frame = self._slots.pop(camera, None)
        if frame is not None:
            self._on_drop(frame, reason)

    def close(self) -> None:
        """Drop every waiting frame as `shutdown`; later puts are dropped the same way."""
        with self._cond:
            self._closed = True
            frames, self._slots = list(self._slots.values()), {}
            self._cond.notify_all()
        for frame in frames:
            self._on_drop(frame, DropReason.SHUTDOWN)


class Batcher:
    """Forms batches from the board: at most one frame per camera, cameras in round-robin order.

    Not a thread: the pipeline's inference thread calls `next_batch(limit, max_wait_s)` with the
    settings of the inference context it will run the batch with, so a batch always fits its engine.
    """

    def __init__(self, board: FrameBoard):
        self.board = board
        self._rr: list[str] = []  # round-robin order of cameras
        self._lock = threading.Lock()  # forget() comes from another thread than next_batch()

    def _order(self) -> list[str]:
        waiting = self.board.cameras()
        with self._lock:
            self._rr += [cam for cam in waiting if cam not in self._rr]
            return list(self._rr)

    def _rotate(self, taken: list[Frame]) -> None:
        """Cameras just served go to the back of the queue (round robin); cameras passed over keep their place."""
        served = {f.camera for f in taken}
        with self._lock:
            self._rr = [c for c in self._rr if c not in served] + [f.camera for f in taken]

    def forget(self, camera: str) -> None:
        """A removed camera leaves the round-robin order."""
        with self._lock:
            self._rr = [c for c in self._rr if c != camera]

    def next_batch(self, limit: int, max_wait_s: float, idle_wait_s: float = 0.2) -> Batch | None:
        """Wait (at most idle_wait_s) for a first frame, then up to max_wait_s for more, or a full batch."""
        if not self.board.wait(1, idle_wait_s):
            return None
        # A batch can hold one frame per camera: with fewer cameras than the limit, waiting for
        # `limit` frames would only add max_wait to every batch.
        target = min(limit, len(self._order()))
        deadline = time.monotonic() + max_wait_s
        self.board.wait(target, deadline - time.monotonic())
        taken = self.board.take(self._order(), limit)
        if not taken:
            return None
        self._rotate(taken)
        return Batch(tuple(taken))
