"""Losses said out loud without flooding the journal.

    losses = LossLog(log, "archive", "entries")
    losses.lost("disk_full")          # any thread: the first loss is logged at once...
    losses.flush(due_only=True)       # ...later ones at most every `every_s`, with the count since the last line
    losses.flush()                    # at stop: what is still untold

A metric counts every loss, but nobody reads a metric during an incident at 3 a.m.; the journal is
where a line engineer looks first. One WARNING line per `every_s` at most, e.g. "archive: lost 166
entries in 22 s (disk_full 160, queue_full 6); 166 since start".
"""

from __future__ import annotations

__all__ = ["LossLog"]

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable


class LossLog:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        unit: str,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger, self.what, self.unit, self.every_s, self._clock = logger, what, unit, every_s, clock
        self.total = 0
        self._pending: Counter[str] = Counter()
        self._first = 0.0  # when the first untold loss happened
        self._next = float("-inf")  # the first loss is told at once
        self._lock = threading.Lock()

    def lost(self, reason: str, count: int = 1) -> None:
        """`count` losses for `reason`: logged now if the last line is `every_s` old, else with the next one."""
        with self._lock:
            if not self._pending:
                self._first = self._clock()
            self._pending[reason] += count
            self.total += count
        self.flush(due_only=True)

    def flush(self, due_only: bool = False) -> None:
        """Log what is untold (with `due_only`, only if the last line is at least `every_s` old)."""
        now = self._clock()
        with self._lock:
            if not self._pending or (due_only and now < self._next):
                return
            pending, self._pending = self._pending, Counter()
            first, self._next, total = self._first, now + self.every_s, self.total
        span = f" in {now - first:.0f} s" if now - first >= 1 else ""
        reasons = ", ".join(f"{reason} {n}" for reason, n in pending.most_common())
        self.logger.warning(
            "%s: lost %d %s%s (%s); %d since start", self.what, sum(pending.values()), self.unit, span, reasons, total
        )
