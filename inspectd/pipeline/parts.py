"""Part mode's promise, kept in one place: every part gets exactly one verdict, on time or `not_inspected`.

    ledger = PartLedger(decided=publish_part, where=off_the_board, late=log_late)
    ledger.admit(frame)                         # a camera in part mode captured a part (before the board)
    ledger.verdict(inspection)                  # the model's verdict, in capture order per camera
    ledger.fail(frame, "queue_full")            # it will never reach the model
    ledger.expire(time.monotonic())             # the deadline thread: parts whose deadline passed

The first decision about a part wins, under one lock, so a part cannot get two verdicts: the model's
verdict arriving after the deadline is `late` (told to `late`, never published as a verdict), and
a failure after the verdict changes nothing. A camera's verdicts go out in part order: a part
decided early (refused by a full queue) waits for the parts before it, which all have earlier
deadlines, so it never waits past its own. `decided(result)` is called under the lock, in that
order: it must be short (the part log's append and the publisher's non-blocking queue).
"""

from __future__ import annotations

__all__ = ["PartLedger", "REASONS"]

import heapq
import threading
import time
from collections.abc import Callable

from inspectd.frames import Frame, Inspection, PartResult, PartTag, Verdict

# Why a part is not_inspected (the `reason` of its result and the label of inspectd_parts_not_inspected_total).
REASONS = (
    "deadline",  # its deadline passed while it waited for the model
    "late",  # its deadline passed while the model (or post-processing) worked on it
    "queue_full",  # the camera's part queue was full when it arrived
    "decode",  # its image arrived but could not be decoded
    "incomplete",  # its image arrived incomplete (GenICam: lost packets, no free buffer)
    "camera",  # the camera never sent the image its trigger asked for, or failed after the trigger
    "roi",  # the camera's roi lies outside its image
    "error",  # an unexpected failure: its batch's model call, its crop or resize
    "shutdown",  # still waiting when its camera stopped (shutdown, reload)
)


class PartLedger:
    """The parts between capture and verdict, and the one place their verdicts are decided and released."""

    def __init__(
        self,
        decided: Callable[[PartResult], None],
        where: Callable[[Frame], str] = lambda frame: "late",
        late: Callable[[Inspection, PartResult], None] = lambda insp, result: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        """`where(frame)`: called for a part whose deadline passed, under the ledger's lock; it takes the part off
        the board if it still waits there and says why it expired ("deadline" if it waited, else "late")."""
        self._decided, self._where, self._late, self._clock, self._wall = decided, where, late, clock, wall
        # Undecided parts (a Frame is its own key: by identity) -> what the line does with it if not_inspected.
        self._open: dict[Frame, str] = {}
        # Per camera, every part not yet released, in capture order, with its result once decided: a result goes
        # out only when every earlier part's has (deadlines follow capture order, so this never holds one past
        # its own deadline).
        self._queue: dict[str, dict[Frame, PartResult | None]] = {}
        self._due: list[tuple[float, int, Frame]] = []  # (deadline, admission number, part): a heap
        self._admitted = 0
        self._outcome: dict[Frame, PartResult] = {}  # the last few `late` ones, to pair with the model's verdict
        self._cond = threading.Condition()
        self._actions: dict[str, str] = {}

    def configure(self, camera: str, not_inspected: str) -> None:
        """What the line does with `camera`'s not_inspected parts (`reject` or `accept`)."""
        with self._cond:
            self._actions[camera] = not_inspected

    # -- the stages' side ----------------------------------------------------------------------
    def admit(self, frame: Frame) -> None:
        """A part was captured: from now on it has a deadline."""
        part = _tag(frame)
        with self._cond:
            self._enter(frame)
            self._admitted += 1
            heapq.heappush(self._due, (part.deadline_mono, self._admitted, frame))
            self._cond.notify_all()  # the deadline thread may need to wake earlier

    def verdict(self, insp: Inspection) -> None:
        """The model's verdict on a part (post-processed); a part already decided (late) goes to `late`."""
        frame = insp.frame
        with self._cond:
            now = self._clock()
            self._expire_locked(now)
            if self._open.pop(frame, None) is None:
                earlier = self._outcome.pop(frame, None)
                if earlier is not None:
                    self._late(insp, earlier)
                return
            verdict = Verdict.DEFECT if insp.is_defect else Verdict.OK
            action = "reject" if insp.is_defect else "accept"
            self._decide(frame, verdict, action, "", now, insp.score, insp.threshold)

    def fail(self, frame: Frame, reason: str) -> None:
        """The part will never get the model's verdict: not_inspected (nothing changes if it was decided). A part
        whose image never became a frame (`frames.lost_frame`, never admitted) joins its camera's order here."""
        with self._cond:
            now = self._clock()
            self._expire_locked(now)
            if frame.image.size == 0 and frame not in self._open:
                self._enter(frame)
            action = self._open.pop(frame, None)
            if action is not None:
                self._decide(frame, Verdict.NOT_INSPECTED, action, reason, now)

    # -- the deadline thread's side -------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        """Sleep until the earliest deadline, a new part or `timeout` (seconds), whichever comes first."""
        with self._cond:
            self._skip_decided()
            due = self._due[0][0] - self._clock() if self._due else timeout
            if due > 0:
                self._cond.wait(min(timeout, due))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def expire(self, now: float) -> int:
        """Parts whose deadline is at or before `now`: not_inspected (why: `where`). Returns how many."""
        with self._cond:
            return self._expire_locked(now)

    def close(self, reason: str) -> None:
        """Every part still open: not_inspected (`reason`), in deadline order (the pipeline has stopped)."""
        with self._cond:
            for _, _, frame in sorted(self._due, key=lambda item: item[:2]):
                action = self._open.pop(frame, None)
                if action is not None:
                    self._decide(frame, Verdict.NOT_INSPECTED, action, reason, self._clock())
            self._due = []

    def open_parts(self) -> dict[str, int]:
        """Parts per camera whose verdict has not gone out yet (undecided, or held behind an earlier part)."""
        with self._cond:
            return {camera: len(queue) for camera, queue in self._queue.items() if queue}

    # -- under the lock ------------------------------------------------------------------------
    def _enter(self, frame: Frame) -> None:
        self._open[frame] = self._actions.get(frame.camera, "reject")
        self._queue.setdefault(frame.camera, {})[frame] = None

    def _expire_locked(self, now: float) -> int:
        count = 0
        while self._due and self._due[0][0] <= now:
            _, _, frame = heapq.heappop(self._due)
            action = self._open.pop(frame, None)
            if action is not None:
                self._decide(frame, Verdict.NOT_INSPECTED, action, self._where(frame), now)
                count += 1
        return count

    def _skip_decided(self) -> None:
        while self._due and self._due[0][2] not in self._open:
            heapq.heappop(self._due)

    def _decide(
        self,
        frame: Frame,
        verdict: Verdict,
        action: str,
        reason: str,
        now: float,
        score: float | None = None,
        threshold: float | None = None,
    ) -> None:
        part = _tag(frame)
        result = PartResult(
            camera=frame.camera,
            part_id=part.part_id,
            frame_seq=frame.seq,
            verdict=verdict,
            action=action,
            reason=reason,
            captured_at=frame.captured_at,
            decided_at=self._wall(),
            latency_s=max(0.0, now - frame.captured_mono),
            trigger_at=part.trigger_at,
            score=score,
            threshold=threshold,
        )
        if verdict is Verdict.NOT_INSPECTED and reason == "late":
            self._outcome[frame] = result
            while len(self._outcome) > 1024:  # only to pair a late model verdict with its part: a few suffice
                self._outcome.pop(next(iter(self._outcome)))
        queue = self._queue[frame.camera]
        queue[frame] = result
        while queue:  # release from the front: the camera's verdicts go out in part order
            first = next(iter(queue))
            ready = queue[first]
            if ready is None:
                break
            del queue[first]
            self._decided(ready)


def _tag(frame: Frame) -> PartTag:
    if frame.part is None:
        raise ValueError(f"camera {frame.camera} frame {frame.seq} is not a part")
    return frame.part
