"""Consumer library for `inspectd.event/1` (docs/wire-format.md): subscribe, decode, detect loss and restarts.

    from inspectd.client import Subscriber

    with Subscriber("tcp://linepc:5556", topics=["defect."]) as sub:
        for ev in sub:                       # blocks; sub.recv(timeout_s=1.0) returns None on timeout
            if ev.gap:
                print(f"lost {ev.gap} events on {ev.topic}")
            print(ev.header["camera"], ev.header["score"], ev.mask.shape)

With `replay=` (the daemon's `[replay] endpoint`), a detected gap is filled before the event after
it is handed out: the missed events are fetched (`inspectd.replay/1`) and delivered in seq order,
marked `replayed`, so a consumer sees every event exactly once per (run_id, topic, seq) as long as
the daemon still holds it (its ring, then its archive). `positions` (save them, pass them back)
lets a restarted consumer resume where it stopped:

    with Subscriber("tcp://linepc:5556", ["defect."], replay="tcp://linepc:5557", positions=saved) as sub:
        for ev in sub:
            handle(ev)
            save(sub.positions)              # {run_id: {topic: seq}}: what has been handed out

A daemon that uses CURVE (docs/security.md) needs our key pair and its public key:
`Subscriber(..., curve=ClientKeys.load("me.key_secret", "server.key"))`; a key it does not allow
receives nothing: the daemon counts the refusal and `recv` raises AccessError naming the endpoint.

Needs pyzmq, numpy and OpenCV only (no TensorFlow). One SUB socket per endpoint, so sequence
numbers and restarts are tracked per publisher even when several daemons share topic names.

Every header is checked against the fields its kind documents (type and presence) before it is
handed out, so consumers can index `ev.header["camera"]` without guarding; a message that fails
is skipped and counted (`Subscriber.malformed`). An image attachment is decoded only if its own
header (PNG IHDR, JPEG SOF) gives the size the message header declares, and at most
`MAX_IMAGE_PIXELS`: a small message cannot make a consumer allocate gigabytes.
"""

from __future__ import annotations

__all__ = [
    "EventKind",
    "Event",
    "SeqTracker",
    "Subscriber",
    "ReplayClient",
    "TriggerClient",
    "ReplayError",
    "AccessError",
    "decode_event",
    "image_size",
    "MAX_IMAGE_PIXELS",
]

import dataclasses
import enum
import json
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import cv2
import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from inspectd.errors import ExitCode, InspectdError, UsageError
from inspectd.outputs.wire import (
    DEFAULT_ENDPOINT,
    END_TOPIC,
    HANDSHAKE_FAILED,
    REQUEST_TAG,
    TRIGGER_TAG,
    WireFormatError,
    decode_message,
    parse_rfc3339,
    zmq_reason,
)
from inspectd.security import ClientKeys

log = logging.getLogger("inspectd.client")

# A handshake that fails without a reason is what a client holding the wrong server key sees (and, depending
# on who hangs up first, a plain client of a CURVE daemon), but also a connection cut at the wrong moment (a
# daemon restarting behind a TCP forwarder): never an error; this many in a row over at least this long, with
# no success between, are a warning (on the logger).
_NO_DETAIL_LIMIT = 5
_NO_DETAIL_SPAN_S = 3.0
# A replay request socket reconnects after 0.1 s, then backs off up to this while its daemon is away. (Not the
# SUB sockets: they keep ZeroMQ's 0.1 s, so that they are connected before a restarted daemon's first event,
# which a subscriber without positions would otherwise take for the past.)
_RECONNECT_MAX_MS = 5000
# With on_refused, a daemon that refused our key is tried again after this, doubling up to the maximum
# (a key file replaced non-atomically, an allow-list briefly empty, heal without a restart).
_REFUSED_RETRY_S = (60.0, 600.0)
MAX_IMAGE_PIXELS = 7680 * 4320  # 8K UHD: larger declared attachments are refused, never decoded


class EventKind(str, enum.Enum):
    """The part of the topic before the first dot (`heartbeat` has no camera)."""

    DEFECT = "defect"
    RESULT = "result"
    STATUS = "status"
    EPISODE = "episode"
    PART = "part"  # part mode: one part's one verdict (docs/parts.md)
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
    # HxW uint8, 255 on exactly the published regions, at frame size (decode=True, defect events)
    regions_mask: np.ndarray | None = None
    replayed: bool = False  # fetched from the daemon's replay endpoint to fill a gap (not received live)

    @property
    def camera(self) -> str | None:
        return self.header.get("camera")


class SeqTracker:
    """Loss and restart detection for one endpoint: seq per (run_id, topic), from the wire's rules.

    The first message of a topic seen in a run sets the baseline (gap 0: a late joiner missed those
    on purpose); after that, seq jumping from n to n+k+1 means k messages were lost on the way.
    Several runs may interleave on one endpoint (daemons behind `inspectd proxy`; `shared` is set once
    two runs alternate, which one daemon's runs never do): each counts on its own. A run that names a
    camera an earlier run had is that daemon restarted (`restarted`, on that message, once; the earlier
    run is forgotten); cameras come from the topic (`defect.<camera>`) or a heartbeat's `cameras`. A
    daemon's first heartbeats may name no camera yet: its restart shows at its first camera. Behind one
    proxy, camera ids must therefore be unique across lines; a publisher that never names a camera is
    never taken for a restart.
    """

    MAX_RUNS = 64  # runs tracked at once (one per daemon behind a proxy); the least recent go first

    def __init__(self) -> None:
        self.run_id: str | None = None  # the run of the last message
        self.shared = False  # several daemons' runs seen interleaved on this endpoint
        self._last: dict[str, dict[str, int]] = {}  # run -> topic -> last seq (insertion order: recency)
        self._cameras: dict[str, set[str]] = {}  # run -> cameras seen
        self._forgotten: deque[str] = deque(maxlen=self.MAX_RUNS)  # runs replaced by a restart

    def observe(self, run_id: str, topic: str, seq: int, cameras: Iterable[str] = ()) -> tuple[int, bool]:
        """-> (messages missing before this one, whether this message shows its daemon restarted).
        `cameras`: a heartbeat's cameras (other topics name theirs)."""
        seen = set(cameras) | ({topic.split(".", 1)[1]} if "." in topic else set())
        back = run_id in self._forgotten  # a run taken for replaced speaks again: it was another daemon
        if back:
            self._forgotten.remove(run_id)
            log.warning(
                "two daemons behind one endpoint share a camera id (%s): restarts cannot be told apart; "
                "camera ids must be unique across the lines behind a proxy",
                ", ".join(sorted(seen)) or "?",
            )
        if back or (run_id in self._last and self.run_id not in (None, run_id)):
            self.shared = True
        self.run_id = run_id
        restarted = False
        if run_id not in self._last:
            self._last[run_id], self._cameras[run_id] = {}, set()
            while len(self._last) > self.MAX_RUNS:
                self._forget(next(iter(self._last)))
        if seen and not self._cameras[run_id] and not back:  # its first camera(s): an older run that had one is over
            restarted = self._replace(run_id, seen)
        self._cameras[run_id] |= seen
        self._last[run_id] = self._last.pop(run_id)  # most recent last
        last_seqs = self._last[run_id]
        last = last_seqs.get(topic)
        gap = seq - last - 1 if last is not None and seq > last else 0
        if last is None or seq > last:
            last_seqs[topic] = seq
        return gap, restarted

    def _replace(self, run_id: str, cameras: set[str]) -> bool:
        """Forget the other runs that had any of `cameras`; True if there was one."""
        older = [r for r, cams in self._cameras.items() if r != run_id and cams & cameras]
        for r in older:
            self._forget(r)
            self._forgotten.append(r)
        return bool(older)

    def _forget(self, run_id: str) -> None:
        self._last.pop(run_id, None)
        self._cameras.pop(run_id, None)


# A replay request: (run_id, topic, after_seq) -> (the messages, as multipart lists; the end message's JSON).
# ReplayError when it cannot be answered.
Fetch = Callable[[str, str, int], tuple[list[list[bytes]], dict]]
# A received multipart message -> its Event (replayed=True), or None when it is malformed (counted by the caller).
Decode = Callable[[list[bytes]], "Event | None"]


class GapFiller:
    """Exactly once per (run_id, topic, seq), for the endpoints that have a replay endpoint: which events to
    hand out for each message received, the missed ones first, fetched in seq order. No sockets: the
    subscriber passes each endpoint's `ReplayClient.fetch`, so these rules are tested on their own.

    `positions` ({run_id: {topic: seq}}, what was handed out: a restarted consumer passes it back),
    `gaps` ({topic: messages lost for good}), `replayed` and `replay_failures` are the counts a consumer
    reads. Where a run starts for us, decided at the first message of a run met for the first time:
    - a run that began while this consumer was running (the daemon's `uptime_s` in the run's first
      heartbeat is below our own age: monotonic durations, no clock skew) is followed from seq 1, so the
      events published before our subscription took hold come through replay;
    - so is every new run of a resumed consumer (`positions` given): it began after they were saved;
    - a run that was already going when a fresh consumer started (a late joiner) starts at the present:
      its first heartbeat's `last_seq`, or the first event received.
    The events of a run that arrive before its first heartbeat wait for it (at most `[publish]
    heartbeat_s`, and at most MAX_HELD of them). At most MAX_RUNS runs are remembered, the oldest go first.
    """

    MAX_RUNS = 16
    MAX_HELD = 1000

    def __init__(
        self,
        topics: Iterable[str],
        positions: dict[str, dict[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.topics = list(topics)
        self._clock = clock
        self._started = clock()
        self._resumed = bool(positions)
        self._held: dict[str, list[Event]] = {}  # run -> its events received before its first heartbeat
        self.positions: dict[str, dict[str, int]] = {r: dict(t) for r, t in (positions or {}).items()}
        self.gaps: dict[str, int] = {}
        self.replayed = 0  # events delivered through replay
        self.replay_failures = 0  # fills that could not be made: the endpoint did not answer
        self.settled: set[str] = set(self.positions)  # runs whose every topic counts from its first message
        self._through = {r: dict(t) for r, t in self.positions.items()}  # received or fetched, per run and topic
        self._asked: set[tuple[str, str]] = set()  # (endpoint, earlier run) already asked for its rest
        self._run_of: dict[str, str] = {}  # endpoint -> its current run_id

    def wanted(self, topic: str) -> bool:
        return any(topic.startswith(t) for t in self.topics)

    def count_gap(self, topic: str, gap: int) -> None:
        if gap:
            self.gaps[topic] = self.gaps.get(topic, 0) + gap

    def received(self, endpoint: str, event: Event, fetch: Fetch, decode: Decode) -> list[Event]:
        """The events to hand out for one message received on `endpoint`: the missed ones first (fetched),
        then it, unless it was handed out already (fetched by an earlier fill)."""
        run = event.header["run_id"]
        out: list[Event] = []
        if self._run_of.get(endpoint) != run:
            out += self._finish_old_runs(endpoint, run, fetch, decode)
            self._run_of[endpoint] = run
        if run not in self.settled:
            heartbeat = event.kind is EventKind.HEARTBEAT
            if not (heartbeat or self._resumed):
                held = self._held.setdefault(run, [])
                if len(held) < self.MAX_HELD:  # the restart it may show is flagged on what is handed out first
                    held.append(dataclasses.replace(event, restarted=False))
                    return out
            out += self._settle(run, event, fetch, decode)
        return out + self._settled(run, event, fetch, decode)

    def _settle(self, run: str, first: Event, fetch: Fetch, decode: Decode) -> list[Event]:
        """Where each topic of `run` starts for us (see the class), then the events held for it."""
        uptime = first.header.get("uptime_s") if first.kind is EventKind.HEARTBEAT else None
        began_while_running = isinstance(uptime, (int, float)) and uptime <= self._clock() - self._started
        from_start = self._resumed or began_while_running
        held = self._held.pop(run, [])
        first_held: dict[str, int] = {}
        for e in held:
            first_held[e.topic] = min(first_held.get(e.topic, e.header["seq"]), e.header["seq"])
        last_seq = first.header.get("last_seq") if first.kind is EventKind.HEARTBEAT else None
        last_seq = last_seq if isinstance(last_seq, dict) else {}
        through = self._through.setdefault(run, {})
        for t in {**last_seq, **first_held}:
            last = first_held[t] - 1 if t in first_held else last_seq[t]
            if not self.wanted(t) or t == "heartbeat" or t in through or not isinstance(last, int):
                continue
            start = 0 if from_start else last
            through[t] = start
            self.positions.setdefault(run, {}).setdefault(t, start)
        self.settled.add(run)
        out: list[Event] = []
        for e in held:
            out += self._settled(run, e, fetch, decode)
        return out

    def _settled(self, run: str, event: Event, fetch: Fetch, decode: Decode) -> list[Event]:
        """The message of a run whose start is known: the missed ones first, then it (unless handed out)."""
        topic, seq = event.topic, event.header["seq"]
        through = self._through.setdefault(run, {})
        out: list[Event] = []
        if event.kind is EventKind.HEARTBEAT:
            for t, last in (event.header.get("last_seq") or {}).items():
                if not self.wanted(t) or not isinstance(last, int) or t == "heartbeat":
                    continue
                if last > through.setdefault(t, 0):  # lost during a silence, or a topic new since the start
                    out += self._fetch(run, t, through[t], fetch, decode)[0]
            return out + ([event] if self.wanted("heartbeat") else [])
        have = through.get(topic, 0)  # a topic new to us counts from seq 1
        if seq > have + 1:
            out += self._fetch(run, topic, have, fetch, decode)[0]
        if through.get(topic, have) >= seq:
            return out  # handed out already, through replay
        through[topic] = seq
        return out + [event]

    def handed_out(self, event: Event) -> Event:
        """Record the event as delivered (positions) and say how many before it are lost for good."""
        if event.kind is EventKind.HEARTBEAT:
            return event
        run, seq = event.header["run_id"], event.header["seq"]
        positions = self.positions.setdefault(run, {})
        last = positions.get(event.topic)
        gap = seq - last - 1 if last is not None and seq > last + 1 else 0
        positions[event.topic] = max(seq, last or 0)
        if event.replayed:
            self.replayed += 1
        self.count_gap(event.topic, gap)
        while len(self.positions) > self.MAX_RUNS:
            self.positions.pop(next(iter(self.positions)))
        return dataclasses.replace(event, gap=gap)

    def _fetch(self, run: str, topic: str, after: int, fetch: Fetch, decode: Decode) -> tuple[list[Event], str]:
        """Fetch (run, topic) after `after` until the answer is complete; what it cannot give is lost.
        -> (the events, how the answer ended: complete, unknown_run, or failed)."""
        out: list[Event] = []
        through = self._through.setdefault(run, {})
        while True:
            try:
                messages, end = fetch(run, topic, after)
            except (ReplayError, UsageError) as exc:
                self.replay_failures += 1
                log.warning("cannot fill the gap on %s after seq %d: %s", topic, after, exc)
                return out, "failed"
            for parts in messages:
                event = decode(parts)
                if event is not None and event.topic == topic and event.header["seq"] > through.get(topic, after):
                    through[topic] = event.header["seq"]
                    out.append(event)
            last = end.get("last_seq")
            if end.get("status") != "partial" or not isinstance(last, int) or last <= after:
                if end.get("status") == "complete" and isinstance(last, int):
                    through[topic] = max(through.get(topic, after), last)  # what it could not give is gone
                return out, str(end.get("status"))
            after = last

    def _finish_old_runs(self, endpoint: str, current: str, fetch: Fetch, decode: Decode) -> list[Event]:
        """A daemon restarted (or we resume): fetch what is left of earlier runs (from its archive)."""
        out: list[Event] = []
        for run in [r for r in self._through if r != current and r not in self._run_of.values()]:
            if (endpoint, run) in self._asked:
                continue
            self._asked.add((endpoint, run))  # once per endpoint and session: an unanswered run costs no more
            statuses = set()
            for topic, after in list(self._through[run].items()):
                if self.wanted(topic):
                    got, status = self._fetch(run, topic, after, fetch, decode)
                    out += got
                    statuses.add(status)
            if "complete" in statuses:  # this daemon's run, finished
                self._through.pop(run, None)
        while len(self._through) > self.MAX_RUNS:  # bounded, like positions: the oldest runs go first
            self._through.pop(next(iter(self._through)))
        return out


def _kind(topic: str) -> EventKind:
    try:
        return EventKind(topic.split(".", 1)[0])
    except ValueError:
        raise WireFormatError(f"unknown topic {topic!r}") from None


# -- header fields by kind (docs/wire-format.md) ----------------------------------------------------

_INSPECTION_FIELDS = {
    "camera": "str",
    "frame_seq": "int",
    "captured_at": "time",
    "score": "number",
    "threshold": "number",
    "is_defect": "bool",
    "model": "object",
    "regions": "array",
    "frame": "size",
}
_FIELDS = {
    EventKind.DEFECT: _INSPECTION_FIELDS,
    EventKind.RESULT: _INSPECTION_FIELDS,
    EventKind.STATUS: {"camera": "str", "state": "str"},
    EventKind.EPISODE: {
        "camera": "str",
        "episode": "int",
        "started_at": "time",
        "ended_at": "time",
        "duration_s": "number",
        "frames": "int",
        "defect_frames": "int",
        "peak_score": "number",
        "end_reason": "str",
        "best": "object",
        "model": "object",
        "frame": "size",
    },
    EventKind.PART: {
        "camera": "str",
        "part_id": "str",
        "verdict": "str",
        "action": "str",
        "reason": "str",
        "frame_seq": "int",
        "captured_at": "time",
        "decided_at": "time",
        "latency_ms": "number",
        "model": "object",
    },
    EventKind.HEARTBEAT: {"uptime_s": "number", "cameras": "object"},
}
_OPTIONAL = {"detail": "str", "fps": "number"}  # when present (fps may be null)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_time(value) -> bool:
    """An RFC 3339 string that converts to a local time (watch prints it as one)."""
    if not isinstance(value, str):
        return False
    try:
        datetime.fromtimestamp(parse_rfc3339(value))
    except (ValueError, OverflowError, OSError):
        return False
    return True


_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "time": _is_time,
    "size": lambda v: isinstance(v, dict) and _positive_int(v.get("width")) and _positive_int(v.get("height")),
}


def _region_ok(region) -> bool:
    if not isinstance(region, dict):
        return False
    bbox = region.get("bbox")
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(_CHECKS["int"](v) for v in bbox)
        and _CHECKS["int"](region.get("area_px"))
        and all(_CHECKS["number"](region.get(k)) for k in ("peak", "mean"))
    )


def _check_header(topic: str, kind: EventKind, header: dict) -> None:
    """WireFormatError naming the first field that is missing or of the wrong type for this kind."""
    if header.get("topic") != topic:
        raise WireFormatError(f"topic {topic!r}: header topic {header.get('topic')!r} differs")
    wanted = {"published_at": "time", **_FIELDS[kind]}
    for key, check in wanted.items():
        if not _CHECKS[check](header.get(key)):
            raise WireFormatError(f"topic {topic!r}: header field {key!r} missing or not a valid {check}")
    for key, check in _OPTIONAL.items():
        if header.get(key) is not None and not _CHECKS[check](header[key]):
            raise WireFormatError(f"topic {topic!r}: header field {key!r} is not a {check}")
    if "regions" in wanted and not all(_region_ok(r) for r in header["regions"]):
        raise WireFormatError(f"topic {topic!r}: a region is not {{bbox: [x, y, w, h], area_px, peak, mean}}")


def _attachment_map(topic: str, declared: list, data: list[bytes]) -> dict[str, tuple[dict, bytes]]:
    """kind -> (entry, bytes); WireFormatError for an entry that is not {kind, encoding, width, height}."""
    out: dict[str, tuple[dict, bytes]] = {}
    for entry, part in zip(declared, data):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("kind"), str)
            and isinstance(entry.get("encoding"), str)
            and _positive_int(entry.get("width"))
            and _positive_int(entry.get("height"))
        ):
            raise WireFormatError(f"topic {topic!r}: attachment entry {entry!r} is not {{kind, encoding, width, height}}")
        if entry["kind"] in out:
            raise WireFormatError(f"topic {topic!r}: two {entry['kind']!r} attachments")
        out[entry["kind"]] = (entry, part)
    return out


# -- image attachments: the size from the image's own header, before decoding -------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG format puts first (bytes 8..24)."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise WireFormatError("attachment is not a PNG (no signature and IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment, walking the segments before it."""
    if data[:2] != b"\xff\xd8":
        raise WireFormatError("attachment is not a JPEG (no SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_STANDALONE:
            i += 2
        elif marker in _JPEG_SOF and i + 9 <= len(data):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        else:
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    raise WireFormatError("attachment is a JPEG without a readable frame header")


def image_size(data: bytes, encoding: str) -> tuple[int, int]:
    """(width, height) of a "png" or "jpeg" attachment from its own header, without decoding it."""
    if encoding == "png":
        return _png_size(data)
    if encoding == "jpeg":
        return _jpeg_size(data)
    raise WireFormatError(f"attachment encoding {encoding!r}: expected png or jpeg")


def _decode_image(entry: dict, data: bytes, flags: int, max_pixels: int) -> np.ndarray:
    """Decode an attachment that is exactly the size its entry declares, and not over max_pixels."""
    declared = (entry["width"], entry["height"])
    if declared[0] * declared[1] > max_pixels:
        raise WireFormatError(f"{entry['kind']} attachment of {declared[0]}x{declared[1]}: over {max_pixels} pixels")
    actual = image_size(data, entry["encoding"])
    if actual != declared:
        raise WireFormatError(
            f"{entry['kind']} attachment is {actual[0]}x{actual[1]}, the header declares {declared[0]}x{declared[1]}"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or (image.shape[1], image.shape[0]) != declared:
        raise WireFormatError(f"undecodable {entry['kind']} attachment")
    return image


def decode_event(parts: list[bytes], decode: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> Event:
    """A multipart message -> Event (gap/restarted left at 0/False); WireFormatError if malformed."""
    topic, header, attachments = decode_message(parts)
    kind = _kind(topic)
    _check_header(topic, kind, header)
    found = _attachment_map(topic, header.get("attachments", []), attachments)
    mask = frame = regions = None
    if decode and "mask" in found:
        mask = _decode_image(*found["mask"], cv2.IMREAD_GRAYSCALE, max_pixels)
    if decode and "regions" in found:
        regions = _decode_image(*found["regions"], cv2.IMREAD_GRAYSCALE, max_pixels)
    if decode and "frame" in found:
        frame = cv2.cvtColor(_decode_image(*found["frame"], cv2.IMREAD_COLOR, max_pixels), cv2.COLOR_BGR2RGB)
    raw = {name: data for name, (_, data) in found.items()}
    return Event(topic, kind, header, mask, frame, raw=raw, regions_mask=regions)


# Why a handshake failed (inspectd.outputs.wire.HANDSHAKE_FAILED's reasons), for the one line a user reads.
_REFUSED_BECAUSE = {
    "auth": "the daemon refused our CURVE key: its public key (NAME.key) is not in the daemon's publish.curve_clients folder",
    "protocol": "the security handshake failed: the daemon uses CURVE and we do not (--client-key/--server-key), "
    "or the daemon uses plain text and we CURVE",
    "other": f"the CURVE handshake failed {_NO_DETAIL_LIMIT} times in a row over {_NO_DETAIL_SPAN_S:g} s or more, "
    "without a reason: is the server key the daemon's? (still trying)",
    "other-plain": f"the handshake failed {_NO_DETAIL_LIMIT} times in a row over {_NO_DETAIL_SPAN_S:g} s or more, "
    "without a reason: does the daemon use CURVE (--client-key/--server-key)? (still trying)",
}
_HANDSHAKE_EVENTS = sum(HANDSHAKE_FAILED) | zmq.EVENT_HANDSHAKE_SUCCEEDED


class AccessError(InspectdError):
    """The daemon refused the connection at the security handshake (exit 77, EX_NOPERM)."""

    exit_code = ExitCode.NO_PERMISSION


class ReplayError(Exception):
    """The replay endpoint did not answer in time, or answered with an error."""


def _dealer(
    ctx: zmq.Context, endpoint: str, curve: ClientKeys | None, what: str, options: dict[int, int] | None = None
) -> zmq.Socket:
    """A DEALER socket connected to a daemon's `what` endpoint (replay, trigger); UsageError for a bad endpoint."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    if curve is not None:
        curve.apply(sock)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise UsageError(f"{what} endpoint {endpoint!r}: {zmq_reason(exc)}") from None
    return sock


class ReplayClient:
    """One DEALER socket to a daemon's replay endpoint (`inspectd.replay/1`); one request at a time.

    `fetch(run_id, topic, after_seq)` -> (the messages, as multipart lists, and the end message's
    JSON). A request that is not answered within `timeout_s` raises ReplayError; the socket is then
    made anew, so a late answer can never be taken for the next one."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        timeout_s: float = 5.0,
        max_messages: int = 100_000,
        curve: ClientKeys | None = None,
    ):
        self.ctx, self.endpoint, self.timeout_s, self.max_messages = ctx, endpoint, timeout_s, max_messages
        self.curve = curve
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            # RCVHWM 0: an answer is bounded by the daemon; never drop part of it.
            self._sock = _dealer(self.ctx, self.endpoint, self.curve, "replay", {zmq.RCVHWM: 0})
        return self._sock

    def fetch(self, run_id: str, topic: str, after_seq: int) -> tuple[list[list[bytes]], dict]:
        sock = self._socket()
        request = json.dumps({"run_id": run_id, "topic": topic, "after_seq": int(after_seq)}).encode()
        messages: list[list[bytes]] = []
        try:
            sock.send_multipart([REQUEST_TAG, request], zmq.NOBLOCK)
            deadline = time.monotonic() + self.timeout_s
            while True:
                if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                    raise ReplayError(f"{self.endpoint}: no answer within {self.timeout_s:g} s")
                parts = sock.recv_multipart()
                deadline = time.monotonic() + self.timeout_s  # the answer is flowing: time each message
                if parts[0] == END_TOPIC.encode():
                    end = json.loads(parts[1]) if len(parts) == 2 else {}
                    if not isinstance(end, dict) or end.get("status") == "error":
                        raise ReplayError(f"{self.endpoint}: {end.get('reason') if isinstance(end, dict) else end}")
                    return messages, end
                if len(messages) >= self.max_messages:
                    raise ReplayError(f"{self.endpoint}: more than {self.max_messages} messages in one answer")
                messages.append(parts)
        except (ReplayError, zmq.ZMQError, ValueError):
            self.close()  # a late or partial answer must not be read as the next one's
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class TriggerClient:
    """One DEALER socket to a daemon's trigger endpoint (`inspectd.trigger/1`, docs/parts.md): ask for parts.

    >>> with TriggerClient("tcp://linepc:5558") as triggers:
    ...     answer = triggers.ask("gate", "A-1043")   # {"status": "accepted", "trigger_at": ..., "deadline_ms": ...}

    An answer not received within `timeout_s` comes back as `{"status": "unanswered", "reason": ...}` (the
    daemon is down, or the network): the caller decides (a PLC handshake ends the part not_inspected). The
    socket is then made anew, so a late answer is never taken for the next request's."""

    def __init__(self, endpoint: str, timeout_s: float = 1.0, curve: ClientKeys | None = None):
        self.endpoint, self.timeout_s, self.curve = endpoint, timeout_s, curve
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None

    def __enter__(self) -> TriggerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._ctx.term()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = _dealer(self._ctx, self.endpoint, self.curve, "trigger")
        return self._sock

    def ask(self, camera: str, part_id: str) -> dict:
        """Ask the daemon for part `part_id` on `camera`; the daemon's answer (a dict with `status`)."""
        sock = self._socket()
        try:
            sock.send_multipart([TRIGGER_TAG, json.dumps({"camera": camera, "part_id": part_id}).encode()], zmq.NOBLOCK)
            deadline = time.monotonic() + self.timeout_s
            while sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                parts = sock.recv_multipart()
                answer = json.loads(parts[1]) if len(parts) == 2 and parts[0] == TRIGGER_TAG else None
                ours = (camera, part_id), (None, None)  # an error answer names no part
                if isinstance(answer, dict) and (answer.get("camera"), answer.get("part_id")) in ours:
                    return answer
        except (zmq.ZMQError, ValueError) as exc:
            self.close()
            return {"status": "unanswered", "camera": camera, "part_id": part_id, "reason": f"{self.endpoint}: {exc}"}
        self.close()
        reason = f"{self.endpoint}: no answer within {self.timeout_s:g} s"
        return {"status": "unanswered", "camera": camera, "part_id": part_id, "reason": reason}

    def close(self) -> None:
        """Close the socket (the next `ask` opens a new one); leaving the `with` block also ends the context."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


def _log_malformed(endpoint: str, reason: str) -> None:
    log.warning("%s: skipped a malformed message: %s", endpoint, reason)


class Subscriber:
    """SUB sockets connected to one or more daemons; a context manager.

    `topics` are ZeroMQ prefixes: "defect." (all cameras), "defect.line1-top", "status.", "heartbeat",
    "" (everything). `rcvhwm` bounds what ZeroMQ buffers for us; beyond it messages are lost and show
    up as gaps. Malformed messages are skipped, counted in `malformed`, and reported to
    `on_malformed(endpoint, reason)` (default: a warning on the "inspectd.client" logger).
    """

    def __init__(
        self,
        endpoints: str | list[str] = DEFAULT_ENDPOINT,
        topics: Iterable[str] = ("",),
        rcvhwm: int = 10000,
        decode: bool = True,
        on_malformed: Callable[[str, str], None] | None = None,
        replay: str | list[str | None] | None = None,
        positions: dict[str, dict[str, int]] | None = None,
        replay_timeout_s: float = 5.0,
        curve: ClientKeys | list[ClientKeys | None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        """`replay`: the replay endpoint of each of `endpoints` (one string for one endpoint; None for a
        daemon without replay). `positions`: a previous session's `positions`, to resume from. `curve`: our
        key pair and the daemon's public key (inspectd.security.ClientKeys), for daemons that use CURVE (one
        for all endpoints, or one per endpoint, None for a plain-text one). `on_refused(endpoint, why)`: called
        when a daemon refuses us at the handshake (default: `recv` raises AccessError); the other endpoints
        go on."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise UsageError("no endpoint to subscribe to")
        replays = [replay] * len(self.endpoints) if replay is None or isinstance(replay, str) else list(replay)
        if len(replays) != len(self.endpoints):
            raise UsageError(f"{len(replays)} replay endpoint(s) for {len(self.endpoints)} event endpoint(s)")
        curves = [curve] * len(self.endpoints) if curve is None or isinstance(curve, ClientKeys) else list(curve)
        if len(curves) != len(self.endpoints):
            raise UsageError(f"{len(curves)} CURVE key set(s) for {len(self.endpoints)} event endpoint(s)")
        self.topics = list(topics)
        self.decode = decode
        self.on_malformed = on_malformed or _log_malformed
        self.malformed = 0
        self.filler = GapFiller(self.topics, positions)  # loss counts, positions, and gap filling through replay
        self._ctx = zmq.Context()
        self._poller = zmq.Poller()
        self._sockets: dict[zmq.Socket, tuple[str, SeqTracker]] = {}
        self._monitors: dict[zmq.Socket, tuple[str, bool]] = {}  # handshake events of a SUB socket -> (endpoint, curve)
        self._failed_handshakes: dict[zmq.Socket, list[float]] = {}  # times of failures without a reason, in a row
        self.on_refused = on_refused
        self._rcvhwm = rcvhwm
        self._keys: dict[str, ClientKeys | None] = dict(zip(self.endpoints, curves))
        self._retry: dict[str, tuple[float, float]] = {}  # refused endpoint -> (when to try again, the next wait)
        self._replay: dict[str, ReplayClient] = {}
        self._pending: deque[tuple[Event, bool]] = deque()  # (event, whether it came through the replay path)
        self._restart_pending: set[str] = set()  # runs whose restart showed on a message not handed out
        try:
            for endpoint, replay_endpoint, keys in zip(self.endpoints, replays, curves):
                if replay_endpoint:
                    self._replay[endpoint] = ReplayClient(self._ctx, replay_endpoint, replay_timeout_s, curve=keys)
                self._connect(endpoint, rcvhwm, keys)
        except BaseException:
            self.close()
            raise

    def _connect(self, endpoint: str, rcvhwm: int, keys: ClientKeys | None, tracker: SeqTracker | None = None) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if keys is not None:
            keys.apply(sock)
        self._sockets[sock] = (endpoint, tracker or SeqTracker())  # registered first so close() closes it
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._monitors[monitor] = (endpoint, keys is not None)
        self._failed_handshakes[monitor] = []
        self._poller.register(monitor, zmq.POLLIN)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise UsageError(f"endpoint {endpoint!r}: {zmq_reason(exc)} (expected e.g. tcp://host:5556 or ipc:///path)") from None
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        if endpoint in self._replay and not self.filler.wanted("heartbeat"):
            sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat")  # their last_seq reveals losses during a silence
        self._poller.register(sock, zmq.POLLIN)

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """The next event, or None if none arrives within `timeout_s` (None: wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._pending:
            self._retry_refused()
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if self._retry:  # wake up in time to try a refused endpoint again
                wait_ms = min(wait_ms if wait_ms is not None else 1000, 1000)
            # One message from every ready socket per round, so a busy daemon cannot starve another.
            for sock, _ in self._poller.poll(wait_ms):
                if sock in self._monitors:
                    self._handshake(sock)
                else:
                    self._pending.extend(self._receive(sock))
            if not self._pending and deadline is not None and time.monotonic() >= deadline:
                return None
        event, via_replay = self._pending.popleft()
        if event.header.get("run_id") in self._restart_pending and event.kind is not EventKind.HEARTBEAT:
            self._restart_pending.discard(event.header["run_id"])
            event = dataclasses.replace(event, restarted=True)
        return self.filler.handed_out(event) if via_replay else event

    @property
    def gaps(self) -> dict[str, int]:
        """{topic: messages lost for good}."""
        return self.filler.gaps

    @property
    def positions(self) -> dict[str, dict[str, int]]:
        """{run_id: {topic: seq}}: what has been handed out (save it; pass it back to resume)."""
        return self.filler.positions

    @property
    def replayed(self) -> int:
        """Events delivered through replay."""
        return self.filler.replayed

    @property
    def replay_failures(self) -> int:
        """Gaps that could not be filled: the replay endpoint did not answer."""
        return self.filler.replay_failures

    def _handshake(self, monitor: zmq.Socket) -> None:
        """A refused handshake: AccessError, or `on_refused(endpoint, why)` when given (ZeroMQ never retries a
        refused key: that endpoint stays silent until the subscriber is made anew)."""
        event = parse_monitor_message(monitor.recv_multipart())["event"]
        endpoint, curve = self._monitors[monitor]
        failures = self._failed_handshakes[monitor]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            failures.clear()
            self._retry.pop(endpoint, None)
            return
        reason = HANDSHAKE_FAILED[event]
        if reason == "other":  # ambiguous (a cut connection looks the same): never fatal, a warning if it persists
            failures.append(time.monotonic())
            if len(failures) >= _NO_DETAIL_LIMIT and failures[-1] - failures[0] >= _NO_DETAIL_SPAN_S:
                log.warning("%s: %s (docs/security.md)", endpoint, _REFUSED_BECAUSE["other" if curve else "other-plain"])
                failures.clear()
            return
        why = f"{endpoint}: {_REFUSED_BECAUSE[reason]} (docs/security.md)"
        if self.on_refused is None:
            raise AccessError(why)
        wait = self._retry.get(endpoint, (0.0, _REFUSED_RETRY_S[0]))[1]
        self._retry[endpoint] = (time.monotonic() + wait, min(2 * wait, _REFUSED_RETRY_S[1]))
        self.on_refused(endpoint, f"{why}; trying again in {wait:g} s")

    def _retry_refused(self) -> None:
        """Connect anew to endpoints that refused us, once their wait is over (ZeroMQ itself never would)."""
        now = time.monotonic()
        for endpoint, (at, _) in list(self._retry.items()):
            if now < at:
                continue
            self._retry[endpoint] = (float("inf"), self._retry[endpoint][1])  # until it is refused again
            sock = next(s for s, (e, _) in self._sockets.items() if e == endpoint)
            tracker = self._sockets.pop(sock)[1]
            monitor = next(m for m, (e, _) in self._monitors.items() if e == endpoint)
            for s in (monitor, sock):
                self._poller.unregister(s)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            del self._monitors[monitor], self._failed_handshakes[monitor]
            self._connect(endpoint, self._rcvhwm, self._keys[endpoint], tracker)

    def _receive(self, sock: zmq.Socket) -> list[tuple[Event, bool]]:
        endpoint, tracker = self._sockets[sock]
        event = self._decode(endpoint, sock.recv_multipart())
        if event is None:
            return []
        cameras = event.header.get("cameras") if event.kind is EventKind.HEARTBEAT else None
        gap, restarted = tracker.observe(
            event.header["run_id"], event.topic, event.header["seq"], cameras if isinstance(cameras, dict) else ()
        )
        if endpoint in self._replay and tracker.shared:  # replay answers for one daemon, not a proxy's many
            log.warning(
                "%s carries several daemons (a proxy?): gaps are not filled from %s; give each daemon's "
                "own endpoint and replay endpoint instead",
                endpoint,
                self._replay[endpoint].endpoint,
            )
            self._replay.pop(endpoint).close()
        if endpoint in self._replay:
            out = self.filler.received(
                endpoint,
                dataclasses.replace(event, restarted=restarted),
                self._replay[endpoint].fetch,
                lambda parts: self._decode(endpoint, parts, replayed=True),
            )
            if restarted and not any(e.restarted for e in out):  # shown by a message not handed out
                self._restart_pending.add(event.header["run_id"])
            return [(e, True) for e in out]
        self.filler.count_gap(event.topic, gap)
        return [(dataclasses.replace(event, gap=gap, restarted=restarted), False)]

    def _decode(self, endpoint: str, parts: list[bytes], replayed: bool = False) -> Event | None:
        try:
            event = decode_event(parts, self.decode)
        except WireFormatError as exc:
            self.malformed += 1
            self.on_malformed(endpoint, str(exc))
            return None
        return dataclasses.replace(event, endpoint=endpoint, replayed=replayed)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.recv()
            if event is not None:
                yield event

    def close(self) -> None:
        """Close the sockets (idempotent); messages not yet received are discarded."""
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        for client in self._replay.values():
            client.close()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
