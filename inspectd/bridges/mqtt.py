"""`inspectd bridge mqtt`: the daemons' events on the plant's MQTT broker, nothing lost (docs/integration.md).

    MqttBridge(load_bridge_settings(path)).run()      # until SIGTERM/SIGINT; exit code 0

A process of its own (its own systemd unit), so a broker outage never touches inspection. It
subscribes to every `[[daemons]]` with `inspectd.client.Subscriber` (gaps filled from the daemon's
replay endpoint) and publishes with paho-mqtt, QoS 1, persistent session (clean_session false):

    PREFIX/LINE/CAMERA/defect            the event's header (JSON, the wire header plus "line")
    PREFIX/LINE/CAMERA/defect/RUN/SEQ/mask   its mask PNG; /frame (JPEG, if attached) and /regions (PNG)
                                         likewise: RUN and SEQ are the header's run_id and seq, so an image
                                         finds its header whatever the order of arrival
    PREFIX/LINE/CAMERA/episode           an episode's summary (JSON)
    PREFIX/LINE/CAMERA/status            the camera's state (JSON, retained)
    PREFIX/bridges/CLIENT_ID/state       "online" (retained) / "offline" (retained; the Last Will too)

Nothing lost, at least once: an event counts as forwarded only when the broker has acknowledged
(PUBACK) every message of it, and only then does its seq enter the positions written to
`state_file`. A bridge that restarts resumes from there and fetches the rest from the daemon's
replay (its ring, then its archive); a broker that goes away makes paho hold messages (up to
`max_queued`) and resend them on reconnect; beyond that, the bridge stops reading ZeroMQ, the
daemon drops for it (a seq gap), and the gap is fetched by replay once the broker is back.
Duplicates are possible (QoS 1's at-least-once): a consumer that must see each event once keys on
the header's (run_id, seq).
"""

from __future__ import annotations

__all__ = ["MqttBridge", "Positions", "topics_for"]

import base64
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, cast

from inspectd.bridges import stop_on_signals
from inspectd.bridges.config import BridgeSettings, MqttConfig
from inspectd.client import Event, EventKind, Subscriber
from inspectd.errors import ConfigError, DataError
from inspectd.security import is_loopback_endpoint, private_file

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("inspectd.bridges.mqtt")

_TOPICS = ["defect.", "episode.", "part.", "status.", "heartbeat"]  # heartbeats: the camera states (_statuses_from)
_CAMERA_ID = re.compile(r"[a-z0-9_-]{1,64}")  # as the daemon's config allows: safe in an MQTT topic
_SAVE_EVERY_S = 0.5  # positions are written at most this often (and at stop)
_STOP_FLUSH_S = 5.0  # at stop, how long acknowledgements of what was handed to paho are waited for
# An event the broker has not acknowledged this long while connected (a message it keeps refusing, e.g. over
# its size limit) would pin the bridge: it exits 1 instead; systemd restarts it, and it resends from its positions.
_ACK_TIMEOUT_S = 300.0


# -- what goes where -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message."""

    topic: str
    payload: bytes
    retain: bool = False


def topics_for(event: Event, line: str, cfg: MqttConfig) -> list[Outgoing]:
    """The MQTT messages of one event (empty for kinds not forwarded)."""
    base = f"{cfg.topic_prefix}/{line}/{event.camera}"
    header = {**event.header, "line": line}
    if event.kind is EventKind.STATUS:
        return [Outgoing(f"{base}/status", _json(header), retain=True)]
    if event.kind is EventKind.EPISODE:
        return [Outgoing(f"{base}/episode", _json(header))]
    if event.kind is EventKind.PART:
        return [Outgoing(f"{base}/part", _json(header))]
    if event.kind is not EventKind.DEFECT:
        return []
    if cfg.frames == "inline":
        header["attachments_base64"] = {k: base64.b64encode(v).decode("ascii") for k, v in event.raw.items()}
        return [Outgoing(f"{base}/defect", _json(header))]
    out = [Outgoing(f"{base}/defect", _json(header))]
    if cfg.frames == "separate":  # MQTT orders messages per topic only: run and seq in the topic pair them
        h = event.header
        out += [Outgoing(f"{base}/defect/{h['run_id']}/{h['seq']}/{kind}", data) for kind, data in event.raw.items()]
    return out


def _json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


# -- positions: what the broker has acknowledged ------------------------------------------------------------------


class Positions:
    """{run_id: {topic: seq}} acknowledged by the broker, in `path` (JSON, replaced atomically); None = memory only."""

    MAX_RUNS = 64

    def __init__(self, path: Path | None):
        self.path = path
        self.value: dict[str, dict[str, int]] = self._load(path) if path else {}
        self._dirty = False
        self._saved = 0.0

    def _load(self, path: Path) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DataError(f"mqtt.state_file {path}: unreadable ({exc}); move it away to start from the present") from None
        if not (
            isinstance(data, dict)
            and all(isinstance(t, dict) and all(isinstance(s, int) for s in t.values()) for t in data.values())
        ):
            raise DataError(f"mqtt.state_file {path}: not {{run_id: {{topic: seq}}}}; move it away to start from the present")
        return data

    def advance(self, run_id: str, topic: str, seq: int) -> None:
        topics = self.value.setdefault(run_id, {})
        if seq > topics.get(topic, 0):
            topics[topic] = seq
            self._dirty = True
        while len(self.value) > self.MAX_RUNS:
            self.value.pop(next(iter(self.value)))

    def save(self, force: bool = False) -> None:
        if self.path is None or not self._dirty or (not force and time.monotonic() - self._saved < _SAVE_EVERY_S):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".positions-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.value, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._dirty, self._saved = False, time.monotonic()


@dataclass
class _InFlight:
    """An event handed to paho: its MQTT message ids not yet acknowledged."""

    run_id: str
    topic: str
    seq: int
    mids: set[int]
    sent_mono: float = 0.0


class _Acks:
    """Events in the order handed to paho, per (run, topic); the acknowledged prefix moves into Positions.
    paho's on_publish (its network thread) adds acknowledged message ids; the bridge thread commits."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self._queues: dict[tuple[str, str], deque[_InFlight]] = {}
        self._by_mid: dict[int, _InFlight] = {}
        self._acked: list[int] = []
        self._lock = threading.Lock()
        self.pending = 0

    def sent(self, item: _InFlight) -> None:
        self._queues.setdefault((item.run_id, item.topic), deque()).append(item)
        self._by_mid.update((mid, item) for mid in item.mids)
        self.pending += 1

    def oldest_s(self) -> float:
        """Seconds the oldest event not yet acknowledged has waited (0: none)."""
        heads = [q[0].sent_mono for q in self._queues.values() if q]
        return time.monotonic() - min(heads) if heads else 0.0

    def acked(self, mid: int) -> None:  # paho's thread
        with self._lock:
            self._acked.append(mid)

    def commit(self) -> int:
        """Move every fully acknowledged head into the positions; -> events committed."""
        with self._lock:
            acked, self._acked = self._acked, []
        touched = set()
        for mid in acked:
            item = self._by_mid.pop(mid, None)  # None: the bridge's own state message
            if item is not None:
                item.mids.discard(mid)
                touched.add((item.run_id, item.topic))
        done = 0
        for key in touched:
            queue = self._queues[key]
            while queue and not queue[0].mids:
                item = queue.popleft()
                self.positions.advance(item.run_id, item.topic, item.seq)
                done += 1
            if not queue:
                del self._queues[key]
        self.pending -= done
        return done


# -- the bridge ---------------------------------------------------------------------------------------------------


class MqttBridge:
    """Subscriber -> paho-mqtt, with the acknowledged positions kept on disk."""

    def __init__(self, settings: BridgeSettings):
        self.settings = settings
        self.cfg = settings.mqtt
        self.client_id = self.cfg.effective_client_id()
        self.state_topic = f"{self.cfg.topic_prefix}/bridges/{self.client_id}/state"
        self.positions = Positions(Path(self.cfg.state_file) if self.cfg.state_file else None)
        self._acks = _Acks(self.positions)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._line = {d.endpoint: settings.line_of(d) for d in settings.daemons}
        self.forwarded = 0
        self._statuses: dict[tuple[str, str], str] = {}  # (line, camera) -> the state last published, retained
        self._stopping = False
        self._client: mqtt.Client | None = None
        self._sub: Subscriber | None = None

    def run(self) -> int:
        with stop_on_signals(self._stop):
            try:
                self.start()
                while not self._stop.is_set():
                    self.step()
            finally:
                self.stop()
        return 0

    def start(self) -> None:
        self._client = client = self._mqtt_client()
        client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        client.loop_start()
        d = self.settings.daemons
        self._sub = Subscriber(
            [x.endpoint for x in d],
            _TOPICS,
            decode=False,
            replay=[x.replay or None for x in d],
            positions=self.positions.value or None,
            curve=self.settings.client_keys(),
            on_refused=_refused,
        )
        log.info(
            "bridge mqtt: %d daemon(s) -> mqtt://%s:%d as %s, topics %s/<line>/<camera>/..., positions %s",
            len(d),
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            self.cfg.topic_prefix,
            self.cfg.state_file or "in memory",
        )

    def step(self) -> None:
        """Commit what the broker acknowledged; take one event unless paho holds too much already."""
        self._acks.commit()
        self.positions.save()
        if self._connected.is_set() and self._acks.oldest_s() > _ACK_TIMEOUT_S:
            raise RuntimeError(
                f"the broker has not acknowledged an event for {_ACK_TIMEOUT_S:.0f} s while connected; restarting the bridge"
            )
        if self._acks.pending >= self.cfg.max_queued:
            self._stop.wait(0.05)  # backpressure: ZeroMQ queues, then drops for us; replay refills later
            return
        event = cast(Subscriber, self._sub).recv(timeout_s=0.1)  # made by start()
        if event is None:
            return
        if event.kind is EventKind.HEARTBEAT:
            self._statuses_from(event)
        else:
            self.forward(event)

    def _statuses_from(self, beat: Event) -> None:
        """Each camera's state from its daemon's heartbeat, retained on .../status when the broker does not hold
        it yet: a daemon publishes status.<camera> only on a change, so a bridge started while a camera is up
        would otherwise never say so. Not counted in positions: a retained state is idempotent."""
        cameras = beat.header.get("cameras")
        if not isinstance(cameras, dict):
            return
        line = self._line.get(beat.endpoint, self.cfg.line)
        client = cast("mqtt.Client", self._client)  # made by start()
        for camera, state in cameras.items():
            if not isinstance(camera, str) or not _CAMERA_ID.fullmatch(camera) or not isinstance(state, str):
                continue
            if self._statuses.get((line, camera)) == state:
                continue
            header = {
                "camera": camera,
                "state": state,
                "detail": "",
                "line": line,
                "run_id": beat.header["run_id"],
                "published_at": beat.header.get("published_at"),
                "from": "heartbeat",
            }
            client.publish(f"{self.cfg.topic_prefix}/{line}/{camera}/status", _json(header), qos=1, retain=True)
            self._statuses[(line, camera)] = state

    def forward(self, event: Event) -> None:
        line = self._line.get(event.endpoint, self.cfg.line)
        outgoing = topics_for(event, line, self.cfg)
        if not outgoing:
            return
        if event.kind is EventKind.STATUS:  # the state the broker now holds (a heartbeat corrects a replayed one)
            self._statuses[(line, str(event.camera))] = str(event.header.get("state"))
        client = cast("mqtt.Client", self._client)  # made by start()
        mids = set()
        for msg in outgoing:
            qos = 1 if msg.retain else self.cfg.qos
            info = client.publish(msg.topic, msg.payload, qos=qos, retain=msg.retain)
            if info.rc not in (0, 4):  # 4: MQTT_ERR_NO_CONN, queued for the reconnect
                # Never acknowledged: stop (exit 1, systemd restarts the bridge) rather than stall; the
                # restarted bridge resends from its positions.
                raise RuntimeError(f"paho cannot take a message for {msg.topic}: rc {info.rc}")
            mids.add(info.mid)
        self._acks.sent(_InFlight(event.header["run_id"], event.topic, event.header["seq"], mids, time.monotonic()))
        self.forwarded += 1

    def stop(self) -> None:
        """Stop reading, wait a while for the broker's acknowledgements, save positions, say offline."""
        self._stop.set()
        if self._sub is not None:
            self._sub.close()
        if self._client is None:
            return
        deadline = time.monotonic() + _STOP_FLUSH_S
        while self._acks.pending and time.monotonic() < deadline and self._connected.is_set():
            self._acks.commit()
            time.sleep(0.02)
        self._acks.commit()
        self.positions.save(force=True)
        if self._acks.pending:
            log.warning(
                "stopping with %d event(s) not acknowledged by the broker: sent again at the next start", self._acks.pending
            )
        if self._connected.is_set():
            self._client.publish(self.state_topic, _state("offline"), qos=1, retain=True).wait_for_publish(2)
        self._stopping = True  # the disconnect that follows is ours, not a lost broker
        self._client.disconnect()
        self._client.loop_stop()
        log.info("bridge mqtt stopped: %d event(s) forwarded", self.forwarded)

    # -- paho ------------------------------------------------------------------------------------------------------
    def _mqtt_client(self) -> mqtt.Client:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        if self.cfg.username:
            password = None
            if self.cfg.password_file:
                path = private_file(self.cfg.password_file, "mqtt.password_file")
                password = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
            client.username_pw_set(self.cfg.username, password)
        if self.cfg.tls_ca_file:
            try:
                client.tls_set(ca_certs=self.cfg.tls_ca_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls_ca_file {self.cfg.tls_ca_file!r}: {exc}") from None
        if self.cfg.username and not self.cfg.tls_ca_file and not is_loopback_endpoint(f"tcp://{self.cfg.host}:1"):
            log.warning("mqtt: the broker password goes to %s in plain text: set mqtt.tls_ca_file (port 8883)", self.cfg.host)
        client.will_set(self.state_topic, _state("offline"), qos=1, retain=True)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)  # unbounded in paho: the bridge bounds it (max_queued) by not reading
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda _c, _u, mid, _rc, _p: self._acks.acked(mid)
        return client

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self._connected.set()
        log.info("connected to the broker %s:%d", self.cfg.host, self.cfg.port)
        client.publish(self.state_topic, _state("online"), qos=1, retain=True)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        if self._stopping:
            log.info("disconnected from the broker %s:%d", self.cfg.host, self.cfg.port)
        elif self._connected.is_set():
            log.warning("lost the broker %s:%d (%s); paho reconnects, events wait", self.cfg.host, self.cfg.port, reason_code)
        self._connected.clear()


def _refused(endpoint: str, why: str) -> None:
    """A daemon refused our key: the others go on; that one is tried again later (the Subscriber does)."""
    log.error("%s (the other daemons go on)", why)


def _state(state: str) -> bytes:
    return _json({"state": state, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
