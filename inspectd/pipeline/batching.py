"""Latest-frame slots (stream mode) and part queues (part mode) per camera, and the cross-camera batcher.

A camera in stream mode owns one slot: a new frame replaces the old one, and a frame replaced before
it was inferred is dropped as `stale` (counted). Latency therefore never grows with load: when
inference is slower than the cameras, frames are dropped, never queued. A camera in part mode
queues its parts (bounded: `part_queue`), because each needs a verdict; its deadline, not the
queue, bounds their latency (`inspectd.pipeline.parts`). The batcher forms a batch of one model's
cameras (each model's inference thread asks for its own), up to that model's batch limit, one frame
per camera per round in round-robin order so no camera starves, waiting at most `max_wait_ms` after
the first frame. Frames left waiting never vanish: the board hands every frame
it drops to `on_drop(frame, reason)`.
"""

from __future__ import annotations

__all__ = ["FrameBoard", "Batcher", "buckets_for"]

import threading
import time
from collections import deque
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
    """Per camera, the frames waiting for the model, and one condition the batcher waits on. A camera in
    stream mode has one slot (a new frame replaces the waiting one: `stale`); a frame that is a part
    (part mode) joins its camera's queue of at most `part_queue` parts, or is refused (`queue_full`).
    Every frame that leaves the board unrun is handed to `on_drop(frame, reason)`, so no frame
    disappears uncounted.

    >>> board = FrameBoard(on_drop=lambda frame, reason: ...)
    >>> board.put(frame)           # from a capture thread; never blocks for long
    >>> board.take(["a", "b"], 4)  # from the batcher
    >>> board.close()              # at shutdown: waiting frames -> on_drop(frame, "shutdown")
    """

    def __init__(self, on_drop: Callable[[Frame, DropReason], None] = lambda frame, reason: None):
        self._slots: dict[str, deque[Frame]] = {}  # cameras with a frame waiting (never an empty deque)
        self._part_queue: dict[str, int] = {}
        self._cond = threading.Condition()
        self._on_drop = on_drop
        self._closed = False

    def set_part_queue(self, camera: str, size: int) -> None:
        """How many parts of `camera` may wait at most (part mode; default 8)."""
        with self._cond:
            self._part_queue[camera] = size

    def put(self, frame: Frame) -> None:
        """A camera's new frame: replaces the waiting one (stream: `stale`), or queues behind it (a part)."""
        old: Frame | None = None
        with self._cond:
            closed = self._closed
            waiting = self._slots.get(frame.camera)
            if closed:
                old, reason = frame, DropReason.SHUTDOWN  # a capture thread that outlived shutdown
            elif frame.part is not None and waiting is not None and len(waiting) >= self._part_queue.get(frame.camera, 8):
                old, reason = frame, DropReason.QUEUE_FULL  # the new part is refused: those waiting are nearer their verdict
            else:
                if waiting is None:
                    waiting = self._slots[frame.camera] = deque()
                elif frame.part is None:
                    old, reason = waiting.popleft(), DropReason.STALE
                waiting.append(frame)
                self._cond.notify_all()  # every model's inference thread waits here for frames of its own
        if old is not None:
            self._on_drop(old, reason)

    def wait(self, min_frames: int, timeout: float, mine: Callable[[str], bool] | None = None) -> bool:
        """Wait until at least `min_frames` cameras (those `mine(camera)` says, default any) have a frame waiting
        (or timeout, or close); True if they do."""

        def enough() -> bool:
            waiting = len(self._slots) if mine is None else sum(1 for cam in self._slots if mine(cam))
            return self._closed or waiting >= min_frames

        with self._cond:
            return self._cond.wait_for(enough, timeout=max(0.0, timeout)) and not self._closed

    def wake(self) -> None:
        """Wake a waiting batcher (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, order: list[str], limit: int) -> list[Frame]:
        """Remove and return up to `limit` frames, one per camera in `order` per round (a camera with several
        parts waiting gives one more in each further round); the others stay waiting."""
        taken: list[Frame] = []
        with self._cond:
            cameras = [cam for cam in order if cam in self._slots]
            while cameras and len(taken) < limit:
                for cam in list(cameras):
                    if len(taken) == limit:
                        break
                    waiting = self._slots[cam]
                    taken.append(waiting.popleft())
                    if not waiting:
                        del self._slots[cam]
                        cameras.remove(cam)
        return taken

    def cameras(self) -> list[str]:
        """Cameras with a frame waiting."""
        with self._cond:
            return list(self._slots)

    def waiting(self) -> dict[str, int]:
        """Frames waiting, per camera."""
        with self._cond:
            return {cam: len(frames) for cam, frames in self._slots.items()}

    def discard(self, frame: Frame) -> bool:
        """Take `frame` off the board if it waits here (a part whose deadline passed), without `on_drop`: the
        caller accounts for it. False if it does not (taken for the model, or never queued)."""
        with self._cond:
            waiting = self._slots.get(frame.camera)
            if waiting is None or not any(f is frame for f in waiting):
                return False
            waiting.remove(frame)
            if not waiting:
                del self._slots[frame.camera]
            return True

    def drop(self, camera: str, reason: DropReason = DropReason.SHUTDOWN) -> None:
        """Drop a camera's waiting frames (camera stopped or removed)."""
        with self._cond:
            frames = self._slots.pop(camera, deque())
        for frame in frames:
            self._on_drop(frame, reason)

    def close(self) -> None:
        """Drop every waiting frame as `shutdown`; later puts are dropped the same way."""
        with self._cond:
            self._closed = True
            frames = [f for waiting in self._slots.values() for f in waiting]
            self._slots = {}
            self._cond.notify_all()
        for frame in frames:
            self._on_drop(frame, DropReason.SHUTDOWN)


class Batcher:
    """Forms batches from the board: the frames of one model's cameras, one frame per camera per round, cameras in
    round-robin order.

    Not a thread: each model's inference thread calls `next_batch(model, model_of, limit, max_wait_s)` with the
    camera-to-model map and the batch limit of the inference context it will run the batch with, so a batch
    always fits its engine.
    """

    def __init__(self, board: FrameBoard):
        self.board = board
        self._rr: list[str] = []  # round-robin order of cameras (of every model: a batch takes its model's)
        self._lock = threading.Lock()  # forget() and the other models' threads

    def _order(self) -> list[str]:
        waiting = self.board.cameras()
        with self._lock:
            self._rr += [cam for cam in waiting if cam not in self._rr]
            return list(self._rr)

    def _rotate(self, taken: list[Frame]) -> None:
        """Cameras just served go to the back of the queue (round robin); cameras passed over keep their place."""
        served = {f.camera for f in taken}
        with self._lock:
            self._rr = [c for c in self._rr if c not in served] + list(dict.fromkeys(f.camera for f in taken))

    def forget(self, camera: str) -> None:
        """A removed camera leaves the round-robin order."""
        with self._lock:
            self._rr = [c for c in self._rr if c != camera]

    def next_batch(
        self,
        model: str,
        model_of: Callable[[str], str],
        limit: int,
        max_wait_s: float,
        idle_wait_s: float = 0.2,
    ) -> Batch | None:
        """Wait (at most idle_wait_s) for a first frame of `model`'s cameras, then up to max_wait_s for more of
        them, or a full batch."""

        def mine(camera: str) -> bool:
            return model_of(camera) == model

        if not self.board.wait(1, idle_wait_s, mine):
            return None
        cameras = [cam for cam in self._order() if mine(cam)]
        # A batch can hold one frame per camera: with fewer cameras than the limit, waiting for
        # `limit` frames would only add max_wait to every batch.
        target = min(limit, len(cameras))
        deadline = time.monotonic() + max_wait_s
        self.board.wait(target, deadline - time.monotonic(), mine)
        taken = self.board.take([cam for cam in self._order() if mine(cam)], limit)
        if not taken:
            return None
        self._rotate(taken)
        return Batch(tuple(taken))
