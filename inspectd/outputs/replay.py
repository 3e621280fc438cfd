"""Replay (`inspectd.replay/1`, docs/wire-format.md#replay): events a consumer missed, on request.

    ring = Ring(max_messages=1000, max_bytes=64 << 20)         # fanout.listen("replay ring", ring.on_outcome)
    server = ReplayServer(cfg, run_id, ring, archive_index, metrics).start()   # binds now (ConfigError)
    server.stop()

A ZeroMQ ROUTER socket on its own thread. A request is one message `[REQUEST_TAG, JSON]`, JSON
`{"run_id": R, "topic": T, "after_seq": N}`; the answer is the messages of topic T of run R with
seq > N, each exactly as published (`[topic, header, *attachments]`), in seq order, taken from
the in-memory ring and then from the archive, and always one last message `[END_TOPIC, JSON]`
saying how it ended. Requests are untrusted: malformed or oversized ones get an `error` end and
are counted; an answer is bounded in messages and bytes (`partial`: ask again from `last_seq`).
"""

from __future__ import annotations

__all__ = ["Ring", "ReplayServer", "parse_request", "STATUSES"]

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import zmq

from inspectd.outputs.archive import entry_message
from inspectd.outputs.fanout import Fate, Outcome
from inspectd.outputs.sockets import ServerSocket
from inspectd.outputs.wire import (
    END_TOPIC,
    HANDSHAKE_REASONS,
    HEARTBEAT_TOPIC,
    REPLAY_SCHEMA,
    REQUEST_TAG,
    json_object,
    request_body,
)

if TYPE_CHECKING:
    from inspectd.config import ReplayConfig
    from inspectd.metrics import Metrics
    from inspectd.outputs.archive import Archive
    from inspectd.security import ServerKeys

log = logging.getLogger("inspectd.outputs.replay")

# How an answer ended (the end message's "status", and the `status` label of the requests counter).
STATUSES = ("complete", "partial", "unknown_run", "error")
MAX_REQUEST_BYTES = 1024  # a request is about 100 bytes: larger ones get an `error` answer
_MAX_MESSAGE_BYTES = 65536  # larger messages are never read into memory: ZeroMQ disconnects their sender
_ARCHIVE_WAIT_S = 2.0  # how long a seq that is still being written to the archive is waited for
_TICK_MS = 100
_BLOCKED_POLL_MS = 5  # every answer waits for its consumer: look again this soon
_REQUESTS_PER_ROUND = 16  # requests taken before the answers in progress get their turn
_BURST = 8  # messages an answer may send per round before the next answer's turn
_MAX_ANSWERS = 1024  # answers in progress at once (one per consumer); more: "busy"


class Ring:
    """The last messages published, by (topic, seq), for the current run: bounded in count and bytes,
    oldest evicted first. The publisher thread adds; the replay thread reads."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def on_outcome(self, outcome: Outcome) -> None:
        """The publisher's listener: every message sent, heartbeats aside (a replay never asks for them)."""
        if outcome.fate is Fate.SENT and outcome.seq is not None and outcome.topic != HEARTBEAT_TOPIC:
            self.add(outcome.topic, outcome.seq, list(outcome.parts))

    def add(self, topic: str, seq: int, parts: list[bytes]) -> None:
        size = sum(len(p) for p in parts)
        with self._lock:
            self._items[(topic, seq)] = list(parts)
            self._bytes += size
            while self._items and (len(self._items) > self.max_messages or self._bytes > self.max_bytes):
                _, old = self._items.popitem(last=False)
                self._bytes -= sum(len(p) for p in old)

    def get(self, topic: str, seq: int) -> list[bytes] | None:
        with self._lock:
            return self._items.get((topic, seq))

    def seqs(self, topic: str, after_seq: int) -> list[int]:
        """The seqs of `topic` held, above `after_seq`, in order (a scan of at most max_messages keys)."""
        with self._lock:
            return sorted(seq for t, seq in self._items if t == topic and seq > after_seq)


def parse_request(data: bytes) -> tuple[str, str, int]:
    """The JSON of a request -> (run_id, topic, after_seq); ValueError naming what is wrong."""
    req = json_object(data)
    run_id, topic, after = req.get("run_id"), req.get("topic"), req.get("after_seq")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 64:
        raise ValueError("run_id: a string of 1-64 characters expected")
    if not isinstance(topic, str) or not 0 < len(topic) <= 256 or not topic.isascii() or topic == "heartbeat":
        raise ValueError("topic: an ASCII event topic of 1-256 characters expected (not heartbeat)")
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
        raise ValueError("after_seq: an integer >= 0 expected")
    return run_id, topic, after


class ReplayServer:
    """The ROUTER socket and its thread; see the module doc for the protocol."""

    def __init__(
        self,
        cfg: ReplayConfig,
        run_id: str,
        ring: Ring,
        archive: Archive | None,
        metrics: Metrics,
        last_seq: Callable[[str], int],
        keys: ServerKeys | None = None,
    ):
        """`last_seq(topic)`: the highest seq the publisher has sent on topic in this run (0: none).
        `keys`: a CURVE server, as the publisher (docs/security.md)."""
        self.cfg, self.run_id, self.ring, self.archive, self.metrics = cfg, run_id, ring, archive, metrics
        self._last_seq = last_seq
        self._keys = keys
        self._server: ServerSocket | None = None
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._answers: dict[bytes, _Answer] = {}  # in progress, by consumer; insertion order: round robin
        self._thread = threading.Thread(target=self._loop, name="replay", daemon=True)
        self.endpoint = cfg.endpoint
        self.last_progress_mono = time.monotonic()

    def start(self) -> ReplayServer:
        # ROUTER_MANDATORY: a full or vanished peer raises instead of a silent drop.
        self._server = ServerSocket(
            zmq.ROUTER,
            self.cfg.endpoint,
            "replay.endpoint",
            {zmq.MAXMSGSIZE: _MAX_MESSAGE_BYTES, zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: self.cfg.peer_queue, zmq.LINGER: 0},
            self._keys,
            self.metrics.refused("replay", HANDSHAKE_REASONS),
        )
        self._socket, self.endpoint = self._server.sock, self._server.endpoint
        for status in STATUSES:
            self.metrics.replay_requests.labels(status=status)
        log.info("replay (%s) on %s", REPLAY_SCHEMA, self.endpoint)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the replay thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        """Requests in, answers out, interleaved: every answer in progress gets a few messages per round,
        as many as its consumer's queue takes, so a consumer that stops reading (or a flood of them) never
        delays another's answer. Memory per consumer: at most `peer_queue` messages queued at ZeroMQ."""
        server, sock = cast(ServerSocket, self._server), cast(zmq.Socket, self._socket)  # start() made them first
        try:
            while not self._stop.is_set():
                self.last_progress_mono = time.monotonic()
                server.check_handshakes()
                blocked = bool(self._answers) and all(a.blocked for a in self._answers.values())
                wait_ms = _TICK_MS if not self._answers else (_BLOCKED_POLL_MS if blocked else 0)
                for _ in range(_REQUESTS_PER_ROUND):
                    if not sock.poll(wait_ms, zmq.POLLIN):
                        break
                    wait_ms = 0
                    self._request(sock.recv_multipart(zmq.NOBLOCK))
                self._round()
        finally:
            server.close(linger_ms=0)

    def _request(self, parts: list[bytes]) -> None:
        identity = parts[0]
        old = self._answers.pop(identity, None)
        if old is not None:  # a consumer asks one thing at a time: a new request replaces what it no longer waits for
            self.metrics.replay_abandoned.inc()
        if len(self._answers) >= _MAX_ANSWERS:
            self._start(identity, self._refusal("error", reason=f"busy: {_MAX_ANSWERS} answers in progress; ask again"))
            return
        try:
            messages = self._answer(parts)
        except Exception:  # one bad request must not end the endpoint
            log.exception("replay: answering a request failed")
            return
        self._start(identity, messages)

    def _start(self, identity: bytes, messages: Iterator[list[bytes]]) -> None:
        self._answers[identity] = _Answer(identity, messages, time.monotonic() + self.cfg.answer_timeout_s)

    def _round(self) -> None:
        """Each answer in progress: up to _BURST messages, while its consumer's queue takes them."""
        sock = cast(zmq.Socket, self._socket)
        now = time.monotonic()
        for identity, answer in list(self._answers.items()):
            try:
                done = answer.send(sock, _BURST, now + self.cfg.answer_timeout_s)
            except zmq.ZMQError:  # EHOSTUNREACH: the consumer is gone
                done, answer.abandoned = True, True
            except Exception:  # reading an archive entry failed in an unexpected way: this answer ends
                log.exception("replay: answering a request failed")
                done, answer.abandoned = True, True
            if not done and answer.blocked and now > answer.deadline:
                done, answer.abandoned = True, True  # it stopped reading: its queue stays full
            if done:
                del self._answers[identity]
                if answer.abandoned:
                    self.metrics.replay_abandoned.inc()

    def _answer(self, parts: list[bytes]) -> Iterator[list[bytes]]:
        """The messages answering one request, the end message last (generated as they are sent)."""
        try:
            run_id, topic, after = parse_request(request_body(parts[1:], REQUEST_TAG, MAX_REQUEST_BYTES))
        except ValueError as exc:
            return self._refusal("error", reason=str(exc))
        request = {"run_id": run_id, "topic": topic, "after_seq": after}
        if run_id == self.run_id:
            return self._from_this_run(request)
        if self.archive is not None and self.archive.index.knows(run_id, topic):
            return self._from_archive(request, self.archive)
        reason = (
            "another run (the daemon restarted) and not in the archive"
            if self.archive is not None
            else "another run (the daemon restarted); no archive to answer from"
        )
        return self._refusal("unknown_run", request, reason=reason, current_run_id=self.run_id)

    def _refusal(self, status: str, request: dict | None = None, **fields) -> Iterator[list[bytes]]:
        yield self._end(status, request, **fields)

    def _from_this_run(self, request: dict) -> Iterator[list[bytes]]:
        """The ring, then the archive; bounded work: at most max_messages archive entries are looked at,
        and gaps are ranges, never lists of seqs."""
        topic, after = request["topic"], request["after_seq"]
        last = self._last_seq(topic)
        archived: dict[int, object] = {}
        if self.archive is not None and last > after:
            # A message can have left the ring while its entry still waits for the disk: not gone yet.
            self.archive.wait_written(self.run_id, topic, last, _ARCHIVE_WAIT_S)
            archived = dict(self.archive.index.published(self.run_id, topic, after, self.cfg.max_messages))
        horizon = max(archived) if len(archived) >= self.cfg.max_messages else None  # archive seqs beyond: not looked at
        seqs = sorted(set(self.ring.seqs(topic, after)) | set(archived))
        return self._answer_from(request, seqs, archived, last, horizon)

    def _from_archive(self, request: dict, archive: Archive) -> Iterator[list[bytes]]:
        """Another run: what the archive holds (its last seq is not known: the end says what was sent)."""
        found = dict(archive.index.published(request["run_id"], request["topic"], request["after_seq"], self.cfg.max_messages))
        horizon = max(found) if len(found) >= self.cfg.max_messages else None
        return self._answer_from(
            request,
            sorted(found),
            found,
            None,
            horizon,
            reason="another run: from the archive; its events after last_seq, if any, were not archived",
            current_run_id=self.run_id,
        )

    def _answer_from(
        self, request: dict, seqs: list[int], archived: dict, last: int | None, horizon: int | None, **end_fields
    ) -> Iterator[list[bytes]]:
        """`seqs` (from the ring, else the archive) in order within the limits, then the end message.
        `last`: the highest seq that exists (None: unknown, an earlier run); `horizon`: the last seq that
        was looked up in the archive (None: all were)."""
        topic, prev = request["topic"], request["after_seq"]
        budget = _Budget(self.cfg.max_messages, self.cfg.max_bytes)
        missing: list[list[int]] = []
        for seq in seqs:
            if last is not None and seq > last:
                break
            if horizon is not None and seq > horizon:
                break  # beyond what was looked up in the archive: the next request goes on from here
            message = self.ring.get(topic, seq) if request["run_id"] == self.run_id else None
            if message is None and seq in archived:
                message = self._read(archived[seq])
            if message is None:
                continue  # removed meanwhile: part of the gap before the next one sent
            if not budget.take(message):
                horizon = prev
                break
            if seq > prev + 1:
                missing.append([prev + 1, seq - 1])
            yield message
            prev = seq
        if horizon is not None and (last is None or prev < last):
            reason = "answer limit reached: ask again from last_seq"
            yield self._end("partial", request, last_seq=prev, missing=missing, reason=reason, **end_fields)
            return
        if last is not None and last > prev:
            missing.append([prev + 1, last])
            prev = last
        yield self._end("complete", request, last_seq=prev, missing=missing, **end_fields)

    def _read(self, path) -> list[bytes] | None:
        try:
            return entry_message(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # removed meanwhile, or damaged
            return None

    def _end(self, status: str, request: dict | None = None, **fields) -> list[bytes]:
        """The end message (counted when it is made: the answer's status is decided then)."""
        end = {"schema": REPLAY_SCHEMA, "status": status, **(request or {}), **fields}
        self.metrics.replay_requests.labels(status=status).inc()
        if status in ("error", "unknown_run"):
            log.debug("replay: %s: %s", status, fields.get("reason"))
        return [END_TOPIC.encode("ascii"), json.dumps(end, separators=(",", ":")).encode("utf-8")]


class _Answer:
    """One answer in progress: its messages (a generator), the one its consumer's queue did not take yet, and
    the time by which the consumer must take the next (it is abandoned after that)."""

    __slots__ = ("identity", "messages", "pending", "deadline", "blocked", "abandoned")

    def __init__(self, identity: bytes, messages: Iterator[list[bytes]], deadline: float):
        self.identity, self.messages, self.deadline = identity, messages, deadline
        self.pending: list[bytes] | None = None
        self.blocked = self.abandoned = False

    def send(self, sock: zmq.Socket, burst: int, next_deadline: float) -> bool:
        """Up to `burst` messages, without blocking; True when the answer is complete."""
        for _ in range(burst):
            if self.pending is None:
                self.pending = next(self.messages, None)
                if self.pending is None:
                    return True
            try:
                sock.send_multipart([self.identity, *self.pending], zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: try again next round
                self.blocked = True
                return False
            self.pending, self.blocked, self.deadline = None, False, next_deadline
        return False


class _Budget:
    """An answer's limits: at most `messages` messages and `bytes_` bytes (always at least one message)."""

    def __init__(self, messages: int, bytes_: int):
        self.messages, self.bytes, self.used_messages, self.used_bytes = messages, bytes_, 0, 0

    def take(self, message: list[bytes]) -> bool:
        size = sum(len(p) for p in message)
        if self.used_messages and (self.used_messages + 1 > self.messages or self.used_bytes + size > self.bytes):
            return False
        self.used_messages += 1
        self.used_bytes += size
        return True
