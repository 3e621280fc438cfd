"""ZeroMQ publisher of the wire format `inspectd.event/1` (encoding in `inspectd.outputs.wire`).

    pub = Publisher(settings.publish, metrics, run_id=uuid.uuid4().hex, model={"name": "demo", "sha256": "..."},
                    outcome=fanout)       # optional: told what became of every message (inspectd.outputs.fanout)
    pub.start()                           # binds now (ConfigError if it cannot), then sends from its own thread
    pub.publish_inspection(insp, model)   # from any thread; never blocks: queue full -> dropped and counted
    pub.stop()

Only the publisher's thread touches the socket (ZeroMQ sockets are not thread-safe). Sequence
numbers are per topic and assigned when a message is handed to ZeroMQ, so the messages that left
the daemon are numbered 1, 2, 3... without gaps; a gap seen by a consumer is loss on the way to it.
The other outputs (replay ring, archive, recent defects) are listeners of each message's outcome.
"""

from __future__ import annotations

__all__ = ["Publisher"]

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import zmq

from inspectd.frames import CameraState, Inspection, PartResult
from inspectd.losses import LossLog
from inspectd.outputs.fanout import Fate, Listener, Outcome
from inspectd.outputs.sockets import ServerSocket
from inspectd.outputs.wire import (
    HANDSHAKE_REASONS,
    HEARTBEAT_TOPIC,
    SCHEMA,
    encode_message,
    episode_body,
    inspection_body,
    part_body,
    status_body,
    unsent_header,
)

if TYPE_CHECKING:
    from inspectd.config import PublishConfig
    from inspectd.metrics import Metrics
    from inspectd.security import ServerKeys

log = logging.getLogger("inspectd.outputs.publish")

# The publisher loop wakes at least this often (stop requests, the watchdog's `last_progress_mono`).
_TICK_S = 0.1
# At stop, ZeroMQ keeps trying to deliver what it already holds for at most this long.
_MAX_LINGER_S = 1.0


# -- the publisher -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pending:
    """A message waiting for the publisher thread: seq and published_at are stamped when it is sent."""

    topic: str
    body: dict
    attachments: list[bytes]
    kept_frame: tuple[str, bytes] | None = None  # (encoding, data): the frame for the archive, when it is on
    image: Any = None  # a defect event's frame (numpy RGB), for the live view's recent defects; never sent


def _ignore(outcome: Outcome) -> None:
    """The listener of a publisher that has no other outputs."""


class Publisher:
    """ZeroMQ PUB for `inspectd.event/1`: non-blocking for its callers, heartbeats, per-topic seq.

    Backpressure policy: the hand-off queue holds at most `send_hwm` messages; when it is full the
    new message is dropped and counted in `events_dropped{topic}`. ZeroMQ's own per-subscriber
    queue (SNDHWM = send_hwm) drops silently for a subscriber that falls behind, so one stuck
    consumer never costs the others their events; that loss shows as a seq gap on its side.
    """

    def __init__(
        self,
        cfg: PublishConfig,
        metrics: Metrics,
        run_id: str,
        model: dict,
        stats: Callable[[], dict] = dict,
        keys: ServerKeys | None = None,
        outcome: Listener = _ignore,
    ):
        """`model` is named in heartbeats until `stats()` returns a "model" of its own (the daemon's current one).

        `outcome` is told what became of every message, on the thread that decided it (`Fanout`: the
        other outputs). A sent one before its seq shows in `last_seq`, so the replay ring always holds a
        seq a consumer can learn of. Ok frames sampled for the archive are `KEPT`, never published.
        With `keys`, the socket is a CURVE server (docs/security.md)."""
        self.cfg = cfg
        self._outcome = outcome
        self.losses = LossLog(log, f"publisher {cfg.endpoint}", "events")
        self.metrics = metrics
        self.run_id = run_id
        self.last_progress_mono = time.monotonic()
        self._model = dict(model)
        self._stats = stats
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=cfg.send_hwm)
        self._seq: dict[str, int] = defaultdict(int)  # publisher thread only
        self._keys = keys
        self._server: ServerSocket | None = None
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
        self._server = ServerSocket(
            zmq.PUB,
            self.cfg.endpoint,
            "publish.endpoint",
            {zmq.SNDHWM: self.cfg.send_hwm, zmq.LINGER: 0},
            self._keys,
            self.metrics.refused("events", HANDSHAKE_REASONS),
        )
        self._socket, self._endpoint = self._server.sock, self._server.endpoint
        self._started_mono = time.monotonic()
        log.info(
            "publishing %s on %s (%s, run_id %s)",
            SCHEMA,
            self._endpoint,
            "CURVE" if self._server.curve else "plain text",
            self.run_id,
        )
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
        self.losses.flush()  # events offered while it closed

    @property
    def bound(self) -> bool:
        """True while the socket is bound and the sending thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._closing.is_set()

    @property
    def endpoint(self) -> str:
        """The bound endpoint, with a wildcard port (tcp://127.0.0.1:0 or :*) resolved."""
        return self._endpoint

    def last_seq(self, topic: str) -> int:
        """The highest seq sent on `topic` in this run (0: none yet); any thread. A message is in the
        ring before its number shows here, so a replay never finds a seq it cannot serve from memory."""
        return self._seq.get(topic, 0)

    # -- the callers' side (any thread, never blocks) ------------------------------------------
    def publish_episode(self, episode, model: dict, best_event: bool) -> None:
        """episode.<camera>: an episode ended. With `best_event` (episode mode) its best frame is published
        (and archived) first, as the episode's one defect event."""
        if best_event:
            self.publish_inspection(episode.best, model)
        self._enqueue(f"episode.{episode.camera}", *episode_body(episode, model))

    def publish_inspection(self, insp: Inspection, model: dict, results: bool = False, defect_event: bool = True) -> None:
        """defect.<camera> when the frame is defective; result.<camera> for every frame when `results` is on.

        `model` names the model that produced the inspection ({"name", "sha256"}); `results` is the
        `[publish] results` setting of the inference context it ran in (a reload changes it at once).
        `defect_event` False (episode mode): a defective frame is not a defect event of its own."""
        camera = insp.frame.camera
        kept = (insp.archive_encoding, insp.archive_frame) if insp.archive_frame else None
        if insp.is_defect and defect_event:
            self._enqueue(
                f"defect.{camera}", *inspection_body(insp, model, with_frame=True), kept_frame=kept, image=insp.frame.image
            )
        elif kept is not None and not insp.is_defect:  # an ok frame sampled for retraining: archived, never published
            self._unsent(Fate.KEPT, _Pending(f"result.{camera}", *inspection_body(insp, model, with_frame=False), kept))
        if results:
            self._enqueue(f"result.{camera}", *inspection_body(insp, model, with_frame=False))

    def publish_part(self, result: PartResult, model: dict) -> None:
        """part.<camera>: a part's one verdict (part mode, docs/parts.md)."""
        self._enqueue(f"part.{result.camera}", part_body(result, model), [])

    def publish_status(self, camera: str, state: CameraState, detail: str = "") -> None:
        """status.<camera>: the camera's state changed (up, down, ...)."""
        self._enqueue(f"status.{camera}", status_body(camera, state, detail), [])

    def _enqueue(
        self, topic: str, body: dict, attachments: list[bytes], kept_frame: tuple[str, bytes] | None = None, image=None
    ) -> None:
        item = _Pending(topic, body, attachments, kept_frame, image)
        if self._closing.is_set():
            self._dropped(item, "stopping")
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped(item, "queue_full")

    def _dropped(self, item: _Pending, why: str) -> None:
        """Not published (counted, and logged rate-limited); the listeners still hear of it (the archive keeps
        what the line saw)."""
        self.metrics.events_dropped.labels(topic=item.topic).inc()
        self.losses.lost(f"{item.topic.split('.', 1)[0]} {why}")
        self._unsent(Fate.DROPPED, item)

    def _unsent(self, fate: Fate, item: _Pending) -> None:
        parts = (item.topic.encode("ascii"), unsent_header(item.topic, self.run_id, item.body), *item.attachments)
        self._outcome(Outcome(fate, parts, None, item.kept_frame, item.image))

    # -- the publisher thread ------------------------------------------------------------------
    def _loop(self) -> None:
        server = cast(ServerSocket, self._server)  # start() made it before this thread
        next_heartbeat = time.monotonic()
        while self._deadline is None:
            now = time.monotonic()
            self.last_progress_mono = now
            server.check_handshakes()
            if now >= next_heartbeat:
                self._send(_Pending(HEARTBEAT_TOPIC, self._heartbeat_body(), []))
                # Keep the period; after a long stall start afresh rather than sending a burst.
                next_heartbeat = max(next_heartbeat + self.cfg.heartbeat_s, now)
            self.losses.flush(due_only=True)
            try:
                item = self._queue.get(timeout=max(0.0, min(next_heartbeat - now, _TICK_S)))
            except queue.Empty:
                continue
            self._send(item)
        self._flush_and_close()

    def _flush_and_close(self) -> None:
        assert self._deadline is not None and self._server is not None
        while True:
            self.last_progress_mono = time.monotonic()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() < self._deadline:
                self._send(item)
            else:
                self._dropped(item, "stop_timeout")
        self.losses.flush()
        linger_s = min(max(0.0, self._deadline - time.monotonic()), _MAX_LINGER_S)
        self._server.close(linger_ms=int(linger_s * 1000))
        log.info("publisher on %s closed", self._endpoint)

    def _send(self, item: _Pending) -> None:
        """Stamp seq and time, hand to ZeroMQ without blocking; the seq is used only if that worked."""
        seq = self._seq[item.topic] + 1
        try:
            parts = encode_message(item.topic, self.run_id, seq, item.body, item.attachments)
            cast(zmq.Socket, self._socket).send_multipart(parts, flags=zmq.NOBLOCK, copy=False)  # made by start()
        except zmq.Again:
            self._dropped(item, "socket_full")
            return
        except Exception:  # an unencodable stats value, a closed socket: drop, count, keep publishing
            log.exception("cannot publish on %s", item.topic)
            self._dropped(item, "error")
            return
        self.metrics.events_published.labels(topic=item.topic).inc()
        self._outcome(Outcome(Fate.SENT, tuple(parts), seq, item.kept_frame, item.image))
        self._seq[item.topic] = seq  # after the listeners: the replay ring holds every seq last_seq names

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
        return {
            "fps": stats.pop("fps", None),
            "cameras": stats.pop("cameras", {}),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "model": self._model,
            "last_seq": {t: n for t, n in self._seq.items() if t != HEARTBEAT_TOPIC},
            **stats,
        }
