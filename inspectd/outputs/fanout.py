"""What became of each message the publisher was given, handed to every output that listens.

    fanout = Fanout()
    fanout.listen("archive", archive.on_outcome)         # start-up wires each output once
    fanout.listen("replay ring", ring.on_outcome)
    publisher = Publisher(cfg, metrics, run_id, model, outcome=fanout)   # calls fanout(outcome) per message

The publisher numbers a message when ZeroMQ takes it; only then is it final, byte for byte, so the
other outputs (replay ring, archive, the live view's recent defects) listen to its outcome rather
than to the pipeline: a message `SENT` with its seq, `DROPPED` (queue full, stopping, ZeroMQ
refused: the header's seq and published_at are null), or `KEPT` (never meant to be published: an ok
frame sampled for the archive). A new output is one more listener; the publisher does not change.
"""

from __future__ import annotations

__all__ = ["Fate", "Outcome", "Listener", "Fanout"]

import enum
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("inspectd.outputs.fanout")


class Fate(enum.Enum):
    SENT = "sent"  # handed to ZeroMQ, numbered
    DROPPED = "dropped"  # to be published, but not: counted in events_dropped
    KEPT = "kept"  # never to be published (an ok frame sampled for the archive)


@dataclass(frozen=True, eq=False)
class Outcome:
    """One message and its fate. `parts` is the multipart message `[topic, header JSON, *attachments]`,
    exactly as sent (SENT) or as it would have been, with seq and published_at null (else)."""

    fate: Fate
    parts: tuple[bytes, ...]
    seq: int | None = None  # SENT only
    kept_frame: tuple[str, bytes] | None = None  # (encoding, data): the frame for the archive, when it is on
    image: Any = None  # a defect event's frame (numpy RGB) as inspected, for the live view; never sent

    @property
    def topic(self) -> str:
        return self.parts[0].decode("ascii")

    @property
    def header(self) -> bytes:
        return self.parts[1]

    @property
    def attachments(self) -> tuple[bytes, ...]:
        return self.parts[2:]


Listener = Callable[[Outcome], None]


class Fanout:
    """Calls every listener with each outcome, in the order they were added, on the caller's thread
    (the publisher's, or a post-processing worker's for a message dropped at the queue): listeners are
    quick and thread-safe. One that raises is logged, once per failure streak, and the others still run."""

    def __init__(self, listeners: Mapping[str, Listener] | None = None) -> None:
        """`listeners`: {name: listener} to start with (the name is what the log says when one fails)."""
        self._listeners: list[tuple[str, Listener]] = list((listeners or {}).items())
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def listen(self, name: str, listener: Listener) -> None:
        """Add `listener` (at start-up, before the first message)."""
        self._listeners.append((name, listener))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._listeners]

    def __call__(self, outcome: Outcome) -> None:
        for name, listener in self._listeners:
            try:
                listener(outcome)
            except Exception:
                self._failed(name)
            else:
                self._recovered(name)

    def _failed(self, name: str) -> None:
        with self._lock:
            first = name not in self._failing
            self._failing.add(name)
        if first:  # once per streak: a broken output must not flood the journal at the event rate
            log.exception("output %s failed on a message; the other outputs go on", name)

    def _recovered(self, name: str) -> None:
        if name in self._failing:
            with self._lock:
                self._failing.discard(name)
            log.info("output %s works again", name)
