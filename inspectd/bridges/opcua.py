"""`inspectd bridge opcua`: each camera's last verdict as OPC UA variables, for a PLC (docs/integration.md).

    OpcUaBridge(load_bridge_settings(path)).run()      # until SIGTERM/SIGINT; exit code 0

An OPC UA server (asyncua) whose address space holds, per camera, under the namespace `[opcua]
namespace` (default `urn:inspectd`), with string node ids a PLC can be configured with once:

    inspectd/LINE/CAMERA                     the camera's object
      .../IsDefect     Boolean   the last verdict (a result, or a defect event)
      .../Score        Double    its score
      .../CapturedAt   DateTime  when the frame was captured (also each value's SourceTimestamp)
      .../EpisodeId    Int64     its defect episode (0: none)
      .../RunId        String    the daemon's run_id
      .../FrameSeq     Int64     its frame_seq (a PLC matches it to the part it tracks), written last
      .../State        String    the camera's state (up, down, ...)
      .../Inspected    Int64     verdicts seen since the bridge started
      .../Defects      Int64     defect verdicts seen since the bridge started
      .../Episodes     Int64     episodes ended since the bridge started

e.g. `ns=2;s=inspectd/line3/top/IsDefect` (the namespace index is whatever the server gives
`urn:inspectd`: a client resolves it by URI). A verdict for every frame needs the daemon's
`[publish] results = true` (result.<camera>); without it only defect events arrive and IsDefect
is the last *defect*. A frame captured before the last one written (a late or repeated event)
changes nothing. Values are read-only to every client (remote admin logins are off). A verdict's variables
are written one after the other with FrameSeq last, each with the frame's capture time as its source
timestamp; they are not one atomic write: a client that needs a consistent set checks that FrameSeq
is the same before and after reading the others.
"""

from __future__ import annotations

__all__ = ["OpcUaBridge", "NODE_VARIABLES"]

import asyncio
import logging
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

from inspectd.bridges.config import BridgeSettings
from inspectd.client import Event, EventKind, Subscriber
from inspectd.errors import ConfigError
from inspectd.outputs.wire import parse_rfc3339
from inspectd.security import private_file

log = logging.getLogger("inspectd.bridges.opcua")

_TOPICS = ["result.", "defect.", "status.", "episode."]
# name -> (OPC UA type name, initial value)
NODE_VARIABLES = {
    "IsDefect": ("Boolean", False),
    "Score": ("Double", 0.0),
    "CapturedAt": ("DateTime", None),
    "EpisodeId": ("Int64", 0),
    "RunId": ("String", ""),
    "FrameSeq": ("Int64", 0),
    "State": ("String", "unknown"),
    "Inspected": ("Int64", 0),
    "Defects": ("Int64", 0),
    "Episodes": ("Int64", 0),
}


def _refused(endpoint: str, why: str) -> None:
    """A daemon refused our key: the others go on; that one is tried again later (the Subscriber does)."""
    log.error("%s (the other daemons go on; its cameras' values are not updated meanwhile)", why)


def _no_asyncua_tracebacks(record: logging.LogRecord) -> bool:
    """asyncua's refusals (an untrusted certificate) keep their one-line message, without the traceback."""
    if record.name.startswith("asyncua") and record.exc_info:
        record.exc_info, record.exc_text = None, None
    return True


class _Camera:
    """One camera's variables and counters."""

    def __init__(self, nodes: dict):
        self.nodes = nodes
        self.inspected = self.defects = self.episodes = 0
        self.last: tuple[float, int] = (float("-inf"), -1)  # (captured_at, frame_seq) of the last verdict written


class OpcUaBridge:
    def __init__(self, settings: BridgeSettings):
        self.settings = settings
        self.cfg = settings.opcua
        self._line = {d.endpoint: settings.line_of(d) for d in settings.daemons}
        self._cameras: dict[tuple[str, str | None], _Camera] = {}  # (line, camera); camera None: an event naming none
        self._stop = threading.Event()
        self.endpoint = self.cfg.endpoint
        self.written = 0

    def run(self) -> int:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("asyncua").setLevel(logging.WARNING)  # it logs every node it creates at INFO
            for handler in logging.getLogger().handlers:  # and a refused client certificate with a traceback
                handler.addFilter(_no_asyncua_tracebacks)
        return asyncio.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        server = await self._server()
        async with server:
            log.info(
                "bridge opcua: %d daemon(s) -> %s (namespace %s, index %d, security %s)",
                len(self.settings.daemons),
                self.cfg.endpoint,
                self.cfg.namespace,
                self._ns,
                self.cfg.security,
            )
            reader = threading.Thread(target=self._read, args=(loop, events), name="opcua-reader", daemon=True)
            reader.start()
            try:
                while not stopped.is_set():
                    get = asyncio.ensure_future(events.get())
                    stop = asyncio.ensure_future(stopped.wait())
                    done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if get not in done:
                        get.cancel()
                        break
                    item = get.result()
                    if isinstance(item, BaseException):
                        raise item  # the reader's error (the bridge exits; systemd restarts it)
                    await self.apply(item)
            finally:
                self._stop.set()
                reader.join(5)
        log.info("bridge opcua stopped: %d verdict(s) written", self.written)
        return 0

    # -- ZeroMQ side: a thread of its own (the Subscriber blocks) ---------------------------------------------------
    def _read(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        d = self.settings.daemons
        try:
            with Subscriber(
                [x.endpoint for x in d],
                _TOPICS,
                decode=False,
                replay=[x.replay or None for x in d],
                curve=self.settings.client_keys(),
                on_refused=_refused,
            ) as sub:
                while not self._stop.is_set():
                    event = sub.recv(timeout_s=0.2)
                    if event is not None and event.kind is not EventKind.HEARTBEAT:
                        loop.call_soon_threadsafe(events.put_nowait, event)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which raises it
            loop.call_soon_threadsafe(events.put_nowait, exc)

    # -- OPC UA side ----------------------------------------------------------------------------------------------
    async def _server(self):
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name("inspectd")
        server.allow_remote_admin(False)  # asyncua's default lets a client named "admin" write anything
        await server.set_application_uri(f"{self.cfg.namespace}:bridge")
        policies = {
            "none": [ua.SecurityPolicyType.NoSecurity],
            "sign_and_encrypt": [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
            "both": [ua.SecurityPolicyType.NoSecurity, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
        }
        server.set_security_policy(policies[self.cfg.security])
        if self.cfg.security != "none":
            await self._load_certificates(server)
        self._ns = await server.register_namespace(self.cfg.namespace)
        self._root = await server.nodes.objects.add_folder(
            ua.NodeId("inspectd", self._ns), ua.QualifiedName("inspectd", self._ns)
        )
        self._ua = ua
        return server

    async def _load_certificates(self, server) -> None:
        try:
            await server.load_certificate(self.cfg.certificate)
            await server.load_private_key(private_file(self.cfg.private_key, "opcua.private_key"))
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:
            raise ConfigError(f"opcua.certificate / opcua.private_key: cannot load: {exc}") from None
        if self.cfg.trusted_clients:
            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            folder = Path(self.cfg.trusted_clients)
            if not folder.is_dir():
                raise ConfigError(f"opcua.trusted_clients {str(folder)!r}: not a folder")
            store = TrustStore([folder], [])
            try:
                await store.load()
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"opcua.trusted_clients {str(folder)!r}: a file there is not a certificate "
                    f"(DER or PEM; keys do not belong there): {exc}"
                ) from None
            server.set_certificate_validator(
                CertificateValidator(
                    CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store
                )
            )

    async def _camera(self, line: str, camera: str | None) -> _Camera:
        key = (line, camera)
        if key not in self._cameras:
            ua, ns = self._ua, self._ns
            base = f"inspectd/{line}/{camera}"
            obj = await self._root.add_object(ua.NodeId(base, ns), ua.QualifiedName(f"{line}/{camera}", ns))
            nodes = {}
            for name, (type_name, initial) in NODE_VARIABLES.items():
                variant = ua.Variant(initial, getattr(ua.VariantType, type_name))
                nodes[name] = await obj.add_variable(ua.NodeId(f"{base}/{name}", ns), ua.QualifiedName(name, ns), variant)
            self._cameras[key] = _Camera(nodes)
            log.info("camera %s of %s: nodes %s/*", camera, line, base)
        return self._cameras[key]

    async def apply(self, event: Event) -> None:
        """Write what one event says into its camera's variables."""
        camera = await self._camera(self._line.get(event.endpoint, self.settings.mqtt.line), event.camera)
        h = event.header
        if event.kind is EventKind.STATUS:
            await self._write(camera, {"State": h["state"]}, None)
        elif event.kind is EventKind.EPISODE:
            camera.episodes += 1
            await self._write(camera, {"Episodes": camera.episodes}, None)
        elif event.kind in (EventKind.RESULT, EventKind.DEFECT):
            # By capture time (frame_seq restarts at 1 with the camera: a reload, a daemon restart): the same
            # frame's other event (defect and result) or an older frame arriving late changes nothing.
            when = (parse_rfc3339(h["captured_at"]), h["frame_seq"])
            if when <= camera.last:
                return
            camera.last = when
            camera.inspected += 1
            camera.defects += bool(h["is_defect"])
            captured = datetime.fromtimestamp(parse_rfc3339(h["captured_at"]), timezone.utc)
            episode = h.get("episode")
            await self._write(
                camera,
                {
                    "IsDefect": bool(h["is_defect"]),
                    "Score": float(h["score"]),
                    "CapturedAt": captured,
                    "EpisodeId": int(episode) if isinstance(episode, int) else 0,
                    "RunId": h["run_id"],
                    "Inspected": camera.inspected,
                    "Defects": camera.defects,
                    "FrameSeq": int(h["frame_seq"]),  # last: a new FrameSeq means this verdict's values are all in
                },
                captured,
            )
            self.written += 1

    async def _write(self, camera: _Camera, values: dict, source_time: datetime | None) -> None:
        ua = self._ua
        for name, value in values.items():
            variant = ua.Variant(value, getattr(ua.VariantType, NODE_VARIABLES[name][0]))
            await camera.nodes[name].write_value(
                ua.DataValue(variant, SourceTimestamp=source_time, ServerTimestamp=datetime.now(timezone.utc))
            )
