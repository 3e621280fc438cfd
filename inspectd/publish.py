"""ZeroMQ publisher of the wire format `inspectd.event/1` (docs/wire-format.md), and its pure encode/decode.

    pub = Publisher(settings.publish, metrics, run_id=uuid.uuid4().hex, model={"name": "demo", "sha256": "..."})
    pub.start()                      # binds now (ConfigError if it cannot), then sends from its own thread
    pub.publish_inspection(insp)     # from any thread; never blocks: queue full -> dropped and counted
    pub.stop()

Only the publisher's thread touches the socket (ZeroMQ sockets are not thread-safe). Sequence
numbers are per topic and assigned when a message is handed to ZeroMQ, so the messages that left
the daemon are numbered 1, 2, 3... without gaps; a gap seen by a consumer is loss on the way to it.
This module imports no TensorFlow and nothing of the daemon beyond `frames` and `errors`, so the
consumer library (`inspectd.client`) shares the encode/decode functions below.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA",
    "DEFAULT_ENDPOINT",
    "WireFormatError",
    "Publisher",
    "rfc3339",
    "parse_rfc3339",
    "inspection_body",
    "status_body",
    "encode_message",
    "decode_message",
]

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import zmq

from inspectd.errors import ConfigError
from inspectd.frames import CameraState, Inspection

if TYPE_CHECKING:
    from inspectd.config import PublishConfig
    from inspectd.metrics import Metrics

log = logging.getLogger("inspectd.publish")

SCHEMA = "inspectd.event/1"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
HEARTBEAT_TOPIC = "heartbeat"
# The publisher loop wakes at least this often (stop requests, the watchdog's `last_progress_mono`).
_TICK_S = 0.1
# At stop, ZeroMQ keeps trying to deliver what it already holds for at most this long.
_MAX_LINGER_S = 1.0


class WireFormatError(ValueError):
    """A message that is not `inspectd.event/1` (wrong number of parts, bad JSON, unknown schema)."""


# -- pure wire-format functions ---------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    """Unix time -> RFC 3339 UTC with microseconds, e.g. '2026-11-26T13:40:00.123456Z'."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """The inverse of `rfc3339` (accepts any RFC 3339 offset): -> Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def inspection_body(insp: Inspection, model: dict, with_frame: bool) -> tuple[dict, list[bytes]]:
    """The inspection fields of a defect/result header and its attachments (mask PNG, then frame JPEG).

    The envelope (schema, run_id, topic, seq, published_at) is added at send time by `encode_message`.
    """
    frame = insp.frame
    attachments: list[dict] = []
    parts: list[bytes] = []
    if insp.mask_png:
        w, h = insp.mask_size
        attachments.append({"kind": "mask", "encoding": "png", "width": int(w), "height": int(h)})
        parts.append(insp.mask_png)
    if with_frame and insp.frame_jpeg:
        attachments.append({"kind": "frame", "encoding": "jpeg", "width": frame.width, "height": frame.height})
        parts.append(insp.frame_jpeg)
    body = {
        "camera": frame.camera,
        "frame_seq": int(frame.seq),
        "captured_at": rfc3339(frame.captured_at),
        "score": float(insp.score),
        "threshold": float(insp.threshold),
        "is_defect": bool(insp.is_defect),
        "model": {"name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))},
        "regions": [_region(r) for r in insp.regions],
        "frame": {"width": frame.width, "height": frame.height},
        "attachments": attachments,
    }
    return body, parts


def _region(region) -> dict:
    x, y, w, h = (int(v) for v in region.bbox)
    return {"bbox": [x, y, w, h], "area_px": int(region.area_px), "peak": float(region.peak), "mean": float(region.mean)}


def status_body(camera: str, state: CameraState | str, detail: str = "") -> dict:
    """The fields of a `status.<camera>` header."""
    return {"camera": camera, "state": CameraState(state).value, "detail": detail}


def _json_default(value):
    """numpy scalars and enums in heartbeat stats are common; anything else is a bug worth seeing."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_message(topic: str, run_id: str, seq: int, body: dict, attachments: Sequence[bytes] = (),
                   published_at: float | None = None) -> list[bytes]:
    """-> the multipart message [topic, header JSON, *attachments] with the envelope fields first."""
    header = {
        "schema": SCHEMA,
        "run_id": run_id,
        "topic": topic,
        "seq": int(seq),
        "published_at": rfc3339(time.time() if published_at is None else published_at),
        **body,
    }
    header.setdefault("attachments", [])  # in every header, so consumers can always zip it with parts 2..
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return [topic.encode("ascii"), data.encode("utf-8"), *attachments]


def decode_message(parts: list[bytes]) -> tuple[str, dict, list[bytes]]:
    """[topic, header JSON, *attachments] -> (topic, header, attachments); WireFormatError if malformed."""
    if len(parts) < 2:
        raise WireFormatError(f"expected at least 2 parts (topic, header), got {len(parts)}")
    try:
        topic = bytes(parts[0]).decode("ascii")
        header = json.loads(bytes(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"undecodable topic or header: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header is not a JSON object")
    if header.get("schema") != SCHEMA:
        raise WireFormatError(f"topic {topic!r}: schema {header.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("run_id", str), ("seq", int)):
        if not isinstance(header.get(key), kind):
            raise WireFormatError(f"topic {topic!r}: header field {key!r} missing or not {kind.__name__}")
    attachments = [bytes(p) for p in parts[2:]]
    declared = header.get("attachments", [])
    if not isinstance(declared, list) or len(declared) != len(attachments):
        raise WireFormatError(f"topic {topic!r}: header names {len(declared) if isinstance(declared, list) else '?'} "
                              f"attachments, message has {len(attachments)}")
    return topic, header, attachments


# -- the publisher -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pending:
    """A message waiting for the publisher thread: seq and published_at are stamped when it is sent."""

    topic: str
    body: dict
    attachments: list[bytes]


class Publisher:
    """ZeroMQ PUB for `inspectd.event/1`: non-blocking for its callers, heartbeats, per-topic seq.

    Backpressure policy: the hand-off queue holds at most `send_hwm` messages; when it is full the
    new message is dropped and counted in `events_dropped{topic}`. ZeroMQ's own per-subscriber
    queue (SNDHWM = send_hwm) drops silently for a subscriber that falls behind, so one stuck
    consumer never costs the others their events; that loss shows as a seq gap on its side.
    """

    def __init__(self, cfg: PublishConfig, metrics: Metrics, run_id: str, model: dict,
                 stats: Callable[[], dict] = dict):
        self.cfg = cfg
        self.metrics = metrics
        self.run_id = run_id
        self.last_progress_mono = time.monotonic()
        self._model = dict(model)
        self._stats = stats
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=cfg.send_hwm)
        self._seq: dict[str, int] = defaultdict(int)  # publisher thread only
        self._ctx: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._endpoint = cfg.endpoint
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()  # no more publish_* accepted
        self._deadline: float | None = None  # monotonic time by which the flush at stop must end
        self._started_mono = time.monotonic()
        self._stats_failing = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind now (ConfigError naming the endpoint if that fails), then start the sending thread."""
        if self._thread is not None:
            raise RuntimeError("Publisher.start() called twice")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self.cfg.send_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.cfg.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            ctx.term()
            raise ConfigError(f"publish.endpoint {self.cfg.endpoint!r}: cannot bind: {zmq.strerror(exc.errno)}") from None
        self._ctx, self._socket = ctx, sock
        self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._started_mono = time.monotonic()
        log.info("publishing %s on %s (run_id %s)", SCHEMA, self._endpoint, self.run_id)
        # The socket moves to the new thread here; Thread.start() is the memory barrier ZeroMQ asks for.
        self._thread = threading.Thread(target=self._loop, name="publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most `timeout` s; the rest is counted as dropped), close, join."""
        self._closing.set()
        if self._thread is None:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._thread.join(timeout + _MAX_LINGER_S + 1.0)
        if self._thread.is_alive():
            log.error("publisher thread did not stop within %.1f s", timeout)

    @property
    def bound(self) -> bool:
        """True while the socket is bound and the sending thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._closing.is_set()

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with a wildcard port (tcp://127.0.0.1:0 or :*) resolved."""
        return self._endpoint

    # -- the callers' side (any thread, never blocks) ------------------------------------------
    def publish_inspection(self, insp: Inspection) -> None:
        """defect.<camera> when the frame is defective; result.<camera> for every frame when `results` is on."""
        camera = insp.frame.camera
        model = self._model
        if insp.is_defect:
            self._enqueue(f"defect.{camera}", *inspection_body(insp, model, with_frame=True))
        if self.cfg.results:
            self._enqueue(f"result.{camera}", *inspection_body(insp, model, with_frame=False))

    def publish_status(self, camera: str, state: CameraState, detail: str = "") -> None:
        """status.<camera>: the camera's state changed (up, down, ...)."""
        self._enqueue(f"status.{camera}", status_body(camera, state, detail), [])

    def set_model(self, model: dict) -> None:
        """The model named in events from now on (after a reload)."""
        self._model = dict(model)

    def _enqueue(self, topic: str, body: dict, attachments: list[bytes]) -> None:
        if self._closing.is_set():
            self.metrics.events_dropped.labels(topic=topic).inc()
            return
        try:
            self._queue.put_nowait(_Pending(topic, body, attachments))
        except queue.Full:
            self.metrics.events_dropped.labels(topic=topic).inc()

    # -- the publisher thread ------------------------------------------------------------------
    def _loop(self) -> None:
        next_heartbeat = time.monotonic()
        while self._deadline is None:
            now = time.monotonic()
            self.last_progress_mono = now
            if now >= next_heartbeat:
                self._send(_Pending(HEARTBEAT_TOPIC, self._heartbeat_body(), []))
                # Keep the period; after a long stall start afresh rather than sending a burst.
                next_heartbeat = max(next_heartbeat + self.cfg.heartbeat_s, now)
            try:
                item = self._queue.get(timeout=max(0.0, min(next_heartbeat - now, _TICK_S)))
            except queue.Empty:
                continue
            self._send(item)
        self._flush_and_close()

    def _flush_and_close(self) -> None:
        assert self._deadline is not None and self._socket is not None and self._ctx is not None
        while True:
            self.last_progress_mono = time.monotonic()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() < self._deadline:
                self._send(item)
            else:
                self.metrics.events_dropped.labels(topic=item.topic).inc()
        linger_s = min(max(0.0, self._deadline - time.monotonic()), _MAX_LINGER_S)
        self._socket.close(linger=int(linger_s * 1000))
        self._ctx.term()
        log.info("publisher on %s closed", self._endpoint)

    def _send(self, item: _Pending) -> None:
        """Stamp seq and time, hand to ZeroMQ without blocking; the seq is used only if that worked."""
        seq = self._seq[item.topic] + 1
        try:
            parts = encode_message(item.topic, self.run_id, seq, item.body, item.attachments)
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.metrics.events_dropped.labels(topic=item.topic).inc()
            return
        except Exception:  # an unencodable stats value, a closed socket: drop, count, keep publishing
            log.exception("cannot publish on %s", item.topic)
            self.metrics.events_dropped.labels(topic=item.topic).inc()
            return
        self._seq[item.topic] = seq
        self.metrics.events_published.labels(topic=item.topic).inc()

    def _heartbeat_body(self) -> dict:
        try:
            stats = dict(self._stats())
            if self._stats_failing:
                log.info("heartbeat stats available again")
            self._stats_failing = False
        except Exception:
            if not self._stats_failing:  # once per outage, not once a second
                log.exception("heartbeat stats failed; sending heartbeats without them")
            self._stats_failing = True
            stats = {}
        return {"fps": stats.pop("fps", None), "cameras": stats.pop("cameras", {}),
                "uptime_s": round(time.monotonic() - self._started_mono, 3), "model": self._model, **stats}
