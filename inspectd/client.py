"""Consumer library for `inspectd.event/1` (docs/wire-format.md): subscribe, decode, detect loss and restarts.

    from inspectd.client import Subscriber

    with Subscriber("tcp://linepc:5556", topics=["defect."]) as sub:
        for ev in sub:                       # blocks; sub.recv(timeout_s=1.0) returns None on timeout
            if ev.gap:
                print(f"lost {ev.gap} events on {ev.topic}")
            print(ev.header["camera"], ev.header["score"], ev.mask.shape)

Needs pyzmq, numpy and OpenCV only (no TensorFlow). One SUB socket per endpoint, so sequence
numbers and restarts are tracked per publisher even when several daemons share topic names.

Every header is checked against the fields its kind documents (type and presence) before it is
handed out, so consumers can index `ev.header["camera"]` without guarding; a message that fails
is skipped and counted (`Subscriber.malformed`). An image attachment is decoded only if its own
header (PNG IHDR, JPEG SOF) gives the size the message header declares, and at most
`MAX_IMAGE_PIXELS`: a small message cannot make a consumer allocate gigabytes.
"""

from __future__ import annotations

__all__ = ["EventKind", "Event", "SeqTracker", "Subscriber", "decode_event", "image_size", "MAX_IMAGE_PIXELS"]

import enum
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import cv2
import numpy as np
import zmq

from inspectd.errors import UsageError
from inspectd.outputs.wire import DEFAULT_ENDPOINT, WireFormatError, decode_message, parse_rfc3339

log = logging.getLogger("inspectd.client")

MAX_IMAGE_PIXELS = 7680 * 4320  # 8K UHD: larger declared attachments are refused, never decoded


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
    # HxW uint8, 255 on exactly the published regions, at frame size (decode=True, defect events)
    regions_mask: np.ndarray | None = None

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


# -- header fields by kind (docs/wire-format.md) ----------------------------------------------------

_INSPECTION_FIELDS = {"camera": "str", "frame_seq": "int", "captured_at": "time", "score": "number",
                      "threshold": "number", "is_defect": "bool", "model": "object", "regions": "array",
                      "frame": "size"}
_FIELDS = {
    EventKind.DEFECT: _INSPECTION_FIELDS,
    EventKind.RESULT: _INSPECTION_FIELDS,
    EventKind.STATUS: {"camera": "str", "state": "str"},
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
    return (isinstance(bbox, list) and len(bbox) == 4 and all(_CHECKS["int"](v) for v in bbox)
            and _CHECKS["int"](region.get("area_px")) and all(_CHECKS["number"](region.get(k)) for k in ("peak", "mean")))


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
        if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str) and isinstance(entry.get("encoding"), str)
                and _positive_int(entry.get("width")) and _positive_int(entry.get("height"))):
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
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
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
        raise WireFormatError(f"{entry['kind']} attachment is {actual[0]}x{actual[1]}, "
                              f"the header declares {declared[0]}x{declared[1]}")
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


def _log_malformed(endpoint: str, reason: str) -> None:
    log.warning("%s: skipped a malformed message: %s", endpoint, reason)


class Subscriber:
    """SUB sockets connected to one or more daemons; a context manager.

    `topics` are ZeroMQ prefixes: "defect." (all cameras), "defect.line1-top", "status.", "heartbeat",
    "" (everything). `rcvhwm` bounds what ZeroMQ buffers for us; beyond it messages are lost and show
    up as gaps. Malformed messages are skipped, counted in `malformed`, and reported to
    `on_malformed(endpoint, reason)` (default: a warning on the "inspectd.client" logger).
    """

    def __init__(self, endpoints: str | list[str] = DEFAULT_ENDPOINT, topics: list[str] = ("",), rcvhwm: int = 10000,
                 decode: bool = True, on_malformed: Callable[[str, str], None] | None = None):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise UsageError("no endpoint to subscribe to")
        self.topics = list(topics)
        self.decode = decode
        self.on_malformed = on_malformed or _log_malformed
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
            self.on_malformed(endpoint, str(exc))
            return None
        gap, restarted = tracker.observe(event.header["run_id"], event.topic, event.header["seq"])
        if gap:
            self.gaps[event.topic] = self.gaps.get(event.topic, 0) + gap
        return Event(event.topic, event.kind, event.header, event.mask, event.frame, gap, restarted, endpoint,
                     event.raw, event.regions_mask)

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
