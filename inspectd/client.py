"""Consumer library for `inspectd.event/1` (docs/wire-format.md): subscribe, decode, detect loss and restarts.

    from inspectd.client import Subscriber

    with Subscriber("tcp://linepc:5556", topics=["defect."]) as sub:
        for ev in sub:                       # blocks; sub.recv(timeout_s=1.0) returns None on timeout
            if ev.gap:
                print(f"lost {ev.gap} events on {ev.topic}")
            print(ev.header["camera"], ev.header["score"], ev.mask.shape)

Needs pyzmq, numpy and OpenCV only (no TensorFlow). One SUB socket per endpoint, so sequence
numbers and restarts are tracked per publisher even when several daemons share topic names.
"""

from __future__ import annotations

__all__ = ["EventKind", "Event", "SeqTracker", "Subscriber", "decode_event"]

import enum
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import zmq

from inspectd.errors import UsageError
from inspectd.outputs.wire import DEFAULT_ENDPOINT, WireFormatError, decode_message

log = logging.getLogger("inspectd.client")


class EventKind(str, enum.Enum):
    """The part of the topic before the first dot (`heartbeat` has no camera)."""

    DEFECT = "defect"
    RESULT = "result"
    STATUS = "status"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, eq=False)
class Event:
    """One received message. `gap`: messages of this topic missing just before this one."""

    topic: str
    kind: EventKind
    header: dict
    mask: np.ndarray | None = None  # HxW uint8 probability 0-255 (decode=True and a mask attached)
    frame: np.ndarray | None = None  # HxWx3 RGB uint8 (decode=True and a frame attached)
    gap: int = 0
    restarted: bool = False  # the first event seen from a new run_id of this publisher
    endpoint: str = ""
    raw: dict[str, bytes] = field(default_factory=dict)  # the attachments as sent: {"mask": png, "frame": jpeg}

    @property
    def camera(self) -> str | None:
        return self.header.get("camera")


class SeqTracker:
    """Loss and restart detection for one publisher: seq per (run_id, topic), from the wire's rules.

    The first message of a topic seen in a run sets the baseline (gap 0: a late joiner missed those
    on purpose); after that, seq jumping from n to n+k+1 means k messages were lost on the way.
    A run_id other than the last one seen means the publisher restarted: its seqs start afresh.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self._last: dict[str, int] = {}

    def observe(self, run_id: str, topic: str, seq: int) -> tuple[int, bool]:
        """-> (messages missing before this one, whether this is the first message of a new run)."""
        restarted = self.run_id is not None and run_id != self.run_id
        if run_id != self.run_id:
            self.run_id, self._last = run_id, {}
        last = self._last.get(topic)
        gap = seq - last - 1 if last is not None and seq > last else 0
        if last is None or seq > last:
            self._last[topic] = seq
        return gap, restarted


def _kind(topic: str) -> EventKind:
    try:
        return EventKind(topic.split(".", 1)[0])
    except ValueError:
        raise WireFormatError(f"unknown topic {topic!r}") from None


def _decode_image(data: bytes, flags: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise WireFormatError("undecodable image attachment")
    return image


def decode_event(parts: list[bytes], decode: bool = True) -> Event:
    """A multipart message -> Event (gap/restarted left at 0/False); WireFormatError if malformed."""
    topic, header, attachments = decode_message(parts)
    raw = {str(a.get("kind")): data for a, data in zip(header["attachments"], attachments)}
    mask = frame = None
    if decode and "mask" in raw:
        mask = _decode_image(raw["mask"], cv2.IMREAD_GRAYSCALE)
    if decode and "frame" in raw:
        frame = cv2.cvtColor(_decode_image(raw["frame"], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return Event(topic, _kind(topic), header, mask, frame, raw=raw)


class Subscriber:
    """SUB sockets connected to one or more daemons; a context manager.

    `topics` are ZeroMQ prefixes: "defect." (all cameras), "defect.line1-top", "status.", "heartbeat",
    "" (everything). `rcvhwm` bounds what ZeroMQ buffers for us; beyond it messages are lost and show
    up as gaps. Malformed messages are logged, counted in `malformed`, and skipped.
    """

    def __init__(self, endpoints: str | list[str] = DEFAULT_ENDPOINT, topics: list[str] = ("",), rcvhwm: int = 10000,
                 decode: bool = True):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise UsageError("no endpoint to subscribe to")
        self.topics = list(topics)
        self.decode = decode
        self.gaps: dict[str, int] = {}
        self.malformed = 0
        self._ctx = zmq.Context()
        self._poller = zmq.Poller()
        self._sockets: dict[zmq.Socket, tuple[str, SeqTracker]] = {}
        self._pending: deque[Event] = deque()
        try:
            for endpoint in self.endpoints:
                self._connect(endpoint, rcvhwm)
        except BaseException:
            self.close()
            raise

    def _connect(self, endpoint: str, rcvhwm: int) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sockets[sock] = (endpoint, SeqTracker())  # registered first so close() closes it
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise UsageError(f"endpoint {endpoint!r}: {zmq.strerror(exc.errno)} (expected e.g. tcp://host:5556 or ipc:///path)") \
                from None
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._poller.register(sock, zmq.POLLIN)

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """The next event, or None if none arrives within `timeout_s` (None: wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._pending:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            # One message from every ready socket per round, so a busy daemon cannot starve another.
            for sock, _ in self._poller.poll(wait_ms):
                event = self._receive(sock)
                if event is not None:
                    self._pending.append(event)
            if not self._pending and deadline is not None and time.monotonic() >= deadline:
                return None
        return self._pending.popleft()

    def _receive(self, sock: zmq.Socket) -> Event | None:
        endpoint, tracker = self._sockets[sock]
        parts = sock.recv_multipart()
        try:
            event = decode_event(parts, self.decode)
        except WireFormatError as exc:
            self.malformed += 1
            log.warning("%s: skipped a malformed message: %s", endpoint, exc)
            return None
        gap, restarted = tracker.observe(event.header["run_id"], event.topic, event.header["seq"])
        if gap:
            self.gaps[event.topic] = self.gaps.get(event.topic, 0) + gap
        return Event(event.topic, event.kind, event.header, event.mask, event.frame, gap, restarted, endpoint,
                     event.raw)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.recv()
            if event is not None:
                yield event

    def close(self) -> None:
        """Close the sockets (idempotent); messages not yet received are discarded."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
