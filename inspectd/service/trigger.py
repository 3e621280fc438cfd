"""The trigger endpoint (`inspectd.trigger/1`, docs/parts.md#the-trigger-endpoint): parts asked for from outside.

    server = TriggerServer(cfg, cameras.get, metrics, keys).start()   # binds now (ConfigError)
    server.stop()

A ZeroMQ ROUTER socket on its own thread, secured as the publisher is (CURVE with the same keys and
allow list). A request is `[TRIGGER_TAG, JSON]`, JSON `{"camera": C, "part_id": P}`; the answer is
`[TRIGGER_TAG, JSON]` with `status` `accepted` (and `trigger_at`, `deadline_ms`) or `refused` /
`error` with a `reason`. A REQ client works too: its empty delimiter frame is echoed. The camera
does the rest on its own thread (`CameraWorker.trigger`): a camera that can be triggered by
software (`genicam://...?trigger=software`) is fired, any other camera in part mode names its next
frame with the id. Requests are untrusted: malformed ones get an `error` answer and are counted.
"""

from __future__ import annotations

__all__ = ["TriggerServer", "parse_trigger", "STATUSES"]

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import zmq

from inspectd.outputs.sockets import ServerSocket
from inspectd.outputs.wire import HANDSHAKE_REASONS, TRIGGER_SCHEMA, TRIGGER_TAG, json_object, request_body, rfc3339

if TYPE_CHECKING:
    from inspectd.config import CameraConfig, TriggerConfig
    from inspectd.metrics import Metrics
    from inspectd.security import ServerKeys

log = logging.getLogger("inspectd.service.trigger")

STATUSES = ("accepted", "refused", "error")
MAX_REQUEST_BYTES = 1024
_TICK_MS = 100


class Triggerable(Protocol):
    """What the endpoint needs of a camera (a `CameraWorker`)."""

    cfg: CameraConfig

    def trigger(self, part_id: str, at: float | None = None) -> str | None: ...


def parse_trigger(data: bytes) -> tuple[str, str]:
    """The JSON of a request -> (camera, part_id); ValueError naming what is wrong."""
    req = json_object(data)
    camera, part_id = req.get("camera"), req.get("part_id")
    if not isinstance(camera, str) or not 0 < len(camera) <= 64:
        raise ValueError("camera: a camera id of 1-64 characters expected")
    if not isinstance(part_id, str) or not 0 < len(part_id) <= 128 or not part_id.isprintable():
        raise ValueError("part_id: 1-128 printable characters expected")
    return camera, part_id


class TriggerServer:
    def __init__(
        self,
        cfg: TriggerConfig,
        camera: Callable[[str], Triggerable | None],
        metrics: Metrics,
        keys: ServerKeys | None = None,
    ):
        """`camera(id)`: the running camera of that id, or None."""
        self.cfg, self._camera, self.metrics, self._keys = cfg, camera, metrics, keys
        self._server: ServerSocket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trigger", daemon=True)
        self.endpoint = cfg.endpoint
        self.last_progress_mono = time.monotonic()

    def start(self) -> TriggerServer:
        self._server = ServerSocket(
            zmq.ROUTER,
            self.cfg.endpoint,
            "trigger.endpoint",
            {zmq.MAXMSGSIZE: 4096, zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: 1000, zmq.LINGER: 0},
            self._keys,
            self.metrics.refused("trigger", HANDSHAKE_REASONS),
        )
        self.endpoint = self._server.endpoint
        for status in STATUSES:
            self.metrics.triggers.labels(status=status)
        log.info("triggers (%s) on %s", TRIGGER_SCHEMA, self.endpoint)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        server = cast(ServerSocket, self._server)  # start() made it first
        sock = server.sock
        try:
            while not self._stop.is_set():
                self.last_progress_mono = time.monotonic()
                server.check_handshakes()
                if not sock.poll(_TICK_MS, zmq.POLLIN):
                    continue
                parts = sock.recv_multipart(zmq.NOBLOCK)
                identity, body = parts[0], parts[1:]
                envelope = [b""] if body[:1] == [b""] else []  # a REQ client's delimiter, echoed
                answer = self._answer(body[len(envelope) :])
                try:
                    sock.send_multipart([identity, *envelope, TRIGGER_TAG, json.dumps(answer).encode()], zmq.NOBLOCK)
                except zmq.ZMQError:  # the client is gone or not reading: its answer is lost, not ours to keep
                    pass
        finally:
            server.close(linger_ms=0)

    def _answer(self, body: list[bytes]) -> dict:
        try:
            camera_id, part_id = parse_trigger(request_body(body, TRIGGER_TAG, MAX_REQUEST_BYTES))
        except ValueError as exc:
            return self._reply("error", reason=str(exc))
        request = {"camera": camera_id, "part_id": part_id}
        camera = self._camera(camera_id)
        if camera is None:
            return self._reply("refused", request, reason=f"no camera {camera_id!r} runs here")
        at = time.time()
        why = camera.trigger(part_id, at)
        if why is not None:
            return self._reply("refused", request, reason=why)
        return self._reply("accepted", request, trigger_at=rfc3339(at), deadline_ms=camera.cfg.deadline_ms)

    def _reply(self, status: str, request: dict | None = None, **fields) -> dict:
        self.metrics.triggers.labels(status=status).inc()
        if status != "accepted":
            log.debug("trigger %s: %s", status, fields.get("reason"))
        return {"schema": TRIGGER_SCHEMA, "status": status, **(request or {}), **fields}
