"""Replay (`inspectd.replay/1`, docs/wire-format.md#replay): events a consumer missed, on request.

    ring = Ring(max_messages=1000, max_bytes=64 << 20)         # the publisher adds what it sent
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

__all__ = ["Ring", "ReplayServer", "REQUEST_TAG", "END_TOPIC", "REPLAY_SCHEMA", "parse_request", "STATUSES"]

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from inspectd.errors import ConfigError

if TYPE_CHECKING:
    from inspectd.outputs.archive import RetentionIndex
    from inspectd.service.config import ReplayConfig
    from inspectd.service.metrics import Metrics

log = logging.getLogger("inspectd.outputs.replay")

REPLAY_SCHEMA = "inspectd.replay/1"
REQUEST_TAG = b"inspectd.replay/1"
END_TOPIC = "replay.end"
# How an answer ended (the end message's "status", and the `status` label of the requests counter).
STATUSES = ("complete", "partial", "unknown_run", "error")
MAX_REQUEST_BYTES = 1024  # a request is about 100 bytes: larger ones get an `error` answer
_MAX_MESSAGE_BYTES = 65536  # larger messages are never read into memory: ZeroMQ disconnects their sender
_SEND_TIMEOUT_MS = 5000  # a consumer that stops reading mid-answer gets the rest of it abandoned
_TICK_MS = 100


class Ring:
    """The last messages published, by (topic, seq), for the current run: bounded in count and bytes,
    oldest evicted first. The publisher thread adds; the replay thread reads."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

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


def parse_request(data: bytes) -> tuple[str, str, int]:
    """The JSON of a request -> (run_id, topic, after_seq); ValueError naming what is wrong."""
    try:
        req = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the request is not UTF-8 JSON") from None
    if not isinstance(req, dict):
        raise ValueError("the request is not a JSON object")
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

    def __init__(self, cfg: ReplayConfig, run_id: str, ring: Ring, archive: RetentionIndex | None,
                 metrics: Metrics, last_seq: Callable[[str], int]):
        """`last_seq(topic)`: the highest seq the publisher has sent on topic in this run (0: none)."""
        self.cfg, self.run_id, self.ring, self.archive, self.metrics = cfg, run_id, ring, archive, metrics
        self._last_seq = last_seq
        self._ctx: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replay", daemon=True)
        self.endpoint = cfg.endpoint
        self.last_progress_mono = time.monotonic()

    def start(self) -> ReplayServer:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer raises instead of a silent drop
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.cfg.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            ctx.term()
            raise ConfigError(f"replay.endpoint {self.cfg.endpoint!r}: cannot bind: {zmq.strerror(exc.errno)}") from None
        self._ctx, self._socket = ctx, sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
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
        sock = self._socket
        try:
            while not self._stop.is_set():
                self.last_progress_mono = time.monotonic()
                if not sock.poll(_TICK_MS, zmq.POLLIN):
                    continue
                parts = sock.recv_multipart(zmq.NOBLOCK)
                try:
                    self._answer(parts)
                except Exception:  # one bad answer must not end the endpoint
                    log.exception("replay: answering a request failed")
        finally:
            sock.close(linger=0)
            self._ctx.term()

    def _answer(self, parts: list[bytes]) -> None:
        identity, body = parts[0], parts[1:]
        if sum(len(p) for p in body) > MAX_REQUEST_BYTES:
            self._end(identity, "error", reason=f"request larger than {MAX_REQUEST_BYTES} bytes")
            return
        if len(body) != 2 or body[0] != REQUEST_TAG:
            self._end(identity, "error", reason=f"a request is 2 parts: {REQUEST_TAG.decode()!r} and a JSON object")
            return
        try:
            run_id, topic, after = parse_request(body[1])
        except ValueError as exc:
            self._end(identity, "error", reason=str(exc))
            return
        request = {"run_id": run_id, "topic": topic, "after_seq": after}
        if run_id == self.run_id:
            self._from_this_run(identity, request)
        elif self.archive is not None and self.archive.knows(run_id, topic):
            self._from_archive(identity, request)
        else:
            reason = ("another run (the daemon restarted) and not in the archive" if self.archive is not None
                      else "another run (the daemon restarted); no archive to answer from")
            self._end(identity, "unknown_run", request, reason=reason, current_run_id=self.run_id)

    def _from_this_run(self, identity: bytes, request: dict) -> None:
        topic, after = request["topic"], request["after_seq"]
        last = self._last_seq(topic)
        archived = dict(self.archive.published(self.run_id, topic, after)) if self.archive is not None else {}
        budget = _Budget(self.cfg.max_messages, self.cfg.max_bytes)
        missing: list[int] = []
        sent_to = after
        for seq in range(after + 1, last + 1):
            message = self.ring.get(topic, seq)
            if message is None and seq in archived:
                message = self._read(archived[seq])
            if message is None:
                missing.append(seq)
                sent_to = seq
                continue
            if not budget.take(message):
                self._end(identity, "partial", request, last_seq=sent_to, missing=_ranges(missing),
                          reason="answer limit reached: ask again from last_seq")
                return
            if not self._send(identity, message):
                return
            sent_to = seq
        self._end(identity, "complete", request, last_seq=max(sent_to, last), missing=_ranges(missing))

    def _from_archive(self, identity: bytes, request: dict) -> None:
        """Another run: what the archive holds (its last seq is not known: the end says what was sent)."""
        budget = _Budget(self.cfg.max_messages, self.cfg.max_bytes)
        expected, missing, sent_to = request["after_seq"] + 1, [], request["after_seq"]
        for seq, path in self.archive.published(request["run_id"], request["topic"], request["after_seq"]):
            message = self._read(path)
            if message is None:
                continue
            if not budget.take(message):
                self._end(identity, "partial", request, last_seq=sent_to, missing=_ranges(missing),
                          reason="answer limit reached: ask again from last_seq")
                return
            missing += range(expected, seq)
            if not self._send(identity, message):
                return
            expected = sent_to = seq
            expected += 1
        self._end(identity, "complete", request, last_seq=sent_to, missing=_ranges(missing),
                  reason="another run: from the archive; its events after last_seq, if any, were not archived",
                  current_run_id=self.run_id)

    def _read(self, path) -> list[bytes] | None:
        from inspectd.outputs.archive import entry_message

        try:
            return entry_message(path)
        except (OSError, ValueError, KeyError):  # removed by retention meanwhile, or damaged
            return None

    def _send(self, identity: bytes, message: list[bytes]) -> bool:
        """False when the consumer cannot take more within the send timeout (the answer is abandoned)."""
        deadline = time.monotonic() + _SEND_TIMEOUT_MS / 1000
        while True:
            try:
                self._socket.send_multipart([identity, *message], zmq.NOBLOCK)
                return True
            except zmq.Again:  # the consumer's queue is full: wait for it a while
                if time.monotonic() > deadline or self._stop.is_set():
                    break
                self._stop.wait(0.01)
            except zmq.ZMQError:  # EHOSTUNREACH: the consumer is gone
                break
        self.metrics.replay_abandoned.inc()
        return False

    def _end(self, identity: bytes, status: str, request: dict | None = None, **fields) -> None:
        end = {"schema": REPLAY_SCHEMA, "status": status, **(request or {}), **fields}
        self.metrics.replay_requests.labels(status=status).inc()
        if status in ("error", "unknown_run"):
            log.debug("replay: %s: %s", status, fields.get("reason"))
        self._send(identity, [END_TOPIC.encode("ascii"), json.dumps(end, separators=(",", ":")).encode("utf-8")])


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


def _ranges(seqs: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9] -> [[3, 5], [9, 9]]: the seqs an answer cannot give (gone for good)."""
    out: list[list[int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out
