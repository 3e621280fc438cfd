"""LossLog: every loss in the journal, at most one line per interval, with the counts since the last line."""

from __future__ import annotations

import logging

from inspectd.losses import LossLog

log = logging.getLogger("tests.losses")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tests.losses"]


def test_the_first_loss_is_told_at_once_and_the_rest_at_most_every_interval(caplog):
    clock = Clock()
    losses = LossLog(log, "archive /a", "entries", every_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tests.losses"):
        losses.lost("disk_full")
        assert _lines(caplog) == ["archive /a: lost 1 entries (disk_full 1); 1 since start"]
        for _ in range(120):  # one every 1/8 s for 15 s
            clock.now += 0.125
            losses.lost("disk_full")
        for _ in range(6):
            losses.lost("queue_full")
        # One more line came when the interval ran out; the rest waits for the next.
        assert _lines(caplog)[1:] == ["archive /a: lost 80 entries in 10 s (disk_full 80); 81 since start"]
        losses.flush(due_only=True)
        assert len(_lines(caplog)) == 2  # not due yet
        clock.now += 10.0
        losses.flush(due_only=True)
        assert _lines(caplog)[2] == "archive /a: lost 46 entries in 15 s (disk_full 40, queue_full 6); 127 since start"
        losses.flush()
        assert len(_lines(caplog)) == 3 and losses.total == 127  # nothing untold: no empty line
