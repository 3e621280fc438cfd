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
      .../Model        String    the model that gave the verdict: its id ([[models]]; "default" for [model])
      .../ModelSha256  String    and its file's sha256
      .../FrameSeq     Int64     its frame_seq (a PLC matches it to the part it tracks), written last
      .../State        String    the camera's state (up, down, ...)
      .../Inspected    Int64     verdicts seen since the bridge started
      .../Defects      Int64     defect verdicts seen since the bridge started
      .../Episodes     Int64     episodes ended since the bridge started

A camera in part mode listed in its daemon's `parts` (and the daemon's `trigger` endpoint) also gets
the part handshake (docs/parts.md#the-plc-handshake-over-opc-ua), a PLC asking for each part:

      .../PartId        String    written by the PLC: the part's id
      .../Trigger       Boolean   set by the PLC: inspect part PartId (a rising edge); reset after Done
      .../Verdict       String    defect, ok or not_inspected
      .../Reject        Boolean   what the line does with the part
      .../Reason        String    why not_inspected
      .../PartScore     Double    the model's score (0 when it never ran)
      .../ResultPartId  String    the PartId this verdict is for
      .../Done          Boolean   the verdict is in (written last); reset when the PLC resets Trigger

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

__all__ = ["OpcUaBridge", "NODE_VARIABLES", "HANDSHAKE_VARIABLES"]

import asyncio
import logging
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

from inspectd.bridges.config import BridgeSettings
from inspectd.client import Event, EventKind, Subscriber, TriggerClient
from inspectd.errors import ConfigError
from inspectd.outputs.wire import parse_rfc3339
from inspectd.security import private_file

log = logging.getLogger("inspectd.bridges.opcua")

_TOPICS = ["result.", "defect.", "status.", "episode.", "part."]
# name -> (OPC UA type name, initial value)
NODE_VARIABLES = {
    "IsDefect": ("Boolean", False),
    "Score": ("Double", 0.0),
    "CapturedAt": ("DateTime", None),
    "EpisodeId": ("Int64", 0),
    "RunId": ("String", ""),
    "Model": ("String", ""),
    "ModelSha256": ("String", ""),
    "FrameSeq": ("Int64", 0),
    "State": ("String", "unknown"),
    "Inspected": ("Int64", 0),
    "Defects": ("Int64", 0),
    "Episodes": ("Int64", 0),
}
# The part handshake of a camera in part mode: name -> (type, initial value, written by the PLC)
HANDSHAKE_VARIABLES = {
    "PartId": ("String", "", True),
    "Trigger": ("Boolean", False, True),
    "Verdict": ("String", "", False),
    "Reject": ("Boolean", False, False),
    "Reason": ("String", "", False),
    "PartScore": ("Double", 0.0, False),
    "ResultPartId": ("String", "", False),
    "Done": ("Boolean", False, False),
}
_TYPES = {**{k: v[0] for k, v in NODE_VARIABLES.items()}, **{k: v[0] for k, v in HANDSHAKE_VARIABLES.items()}}


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


class _Handshake:
    """One part-mode camera's handshake with its PLC: at most one part in flight."""

    def __init__(self, camera: str, camera_nodes: _Camera, triggers: TriggerClient):
        self.camera, self.variables, self.triggers = camera, camera_nodes, triggers
        self.nodes = camera_nodes.nodes
        self.pending: str | None = None  # the PartId asked for, until its verdict is written
        self.busy = False  # from Trigger's rising edge until the PLC resets it
        self.timer: asyncio.TimerHandle | None = None


class OpcUaBridge:
    def __init__(self, settings: BridgeSettings):
        self.settings = settings
        self.cfg = settings.opcua
        self._line = {d.endpoint: settings.line_of(d) for d in settings.daemons}
        self._cameras: dict[tuple[str, str | None], _Camera] = {}  # (line, camera); camera None: an event naming none
        self._handshakes: dict[tuple[str, str], _Handshake] = {}  # (line, camera) of the part cameras
        self._by_trigger_node: dict = {}  # the Trigger node's id -> its handshake
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
            await self._start_handshakes(server)
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
                for handshake in self._handshakes.values():
                    handshake.triggers.close()
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

    # -- the part handshake -----------------------------------------------------------------------------------------
    async def _start_handshakes(self, server) -> None:
        """The handshake nodes of every part camera named in the config, and a subscription to their Trigger."""
        ua = self._ua
        keys = self.settings.client_keys()
        triggers = []
        for daemon, curve in zip(self.settings.daemons, keys):
            for camera_id in daemon.parts:
                line = self.settings.line_of(daemon)
                camera = await self._camera(line, camera_id)
                obj_base = f"inspectd/{line}/{camera_id}"
                parent = server.get_node(ua.NodeId(obj_base, self._ns))
                for name, (type_name, initial, writable) in HANDSHAKE_VARIABLES.items():
                    variant = ua.Variant(initial, getattr(ua.VariantType, type_name))
                    node = await parent.add_variable(
                        ua.NodeId(f"{obj_base}/{name}", self._ns), ua.QualifiedName(name, self._ns), variant
                    )
                    if writable:
                        await node.set_writable()
                    camera.nodes[name] = node
                handshake = _Handshake(camera_id, camera, TriggerClient(daemon.trigger, timeout_s=1.0, curve=curve))
                self._handshakes[(line, camera_id)] = handshake
                self._by_trigger_node[camera.nodes["Trigger"].nodeid] = handshake
                triggers.append(camera.nodes["Trigger"])
                log.info("camera %s of %s: part handshake on %s/{PartId,Trigger,...,Done}", camera_id, line, obj_base)
        if triggers:
            subscription = await server.create_subscription(10, self)  # publishing interval 10 ms
            await subscription.subscribe_data_change(triggers)

    async def datachange_notification(self, node, value, data) -> None:
        """A Trigger changed (asyncua's subscription): rising -> ask for the part; falling -> Done resets."""
        handshake = self._by_trigger_node.get(node.nodeid)
        if handshake is None:
            return
        if value and not handshake.busy:
            handshake.busy = True
            part_id = str(await handshake.nodes["PartId"].read_value() or "")
            await self._ask(handshake, part_id)
        elif not value and handshake.busy:
            handshake.busy = False
            if handshake.timer is not None:
                handshake.timer.cancel()
            handshake.pending = None
            await self._write_handshake(handshake, {"Done": False})

    async def _ask(self, handshake: _Handshake, part_id: str) -> None:
        await self._write_handshake(handshake, {"Done": False})
        if not part_id:
            await self._finish(handshake, part_id, "not_inspected", True, "PartId is empty: write it before Trigger", 0.0)
            return
        handshake.pending = part_id  # before asking: the verdict may overtake the answer
        answer = await asyncio.to_thread(handshake.triggers.ask, handshake.camera, part_id)
        if answer.get("status") != "accepted":
            reason = f"trigger {answer.get('status')}: {answer.get('reason', '')}"
            log.warning("camera %s: part %s: %s", handshake.camera, part_id, reason)
            await self._finish(handshake, part_id, "not_inspected", True, reason, 0.0)
            return
        wait_s = (float(answer.get("deadline_ms", 0)) + self.cfg.deadline_margin_ms) / 1000.0
        loop = asyncio.get_running_loop()
        handshake.timer = loop.call_later(wait_s, lambda: asyncio.ensure_future(self._deadline(handshake, part_id, wait_s)))

    async def _deadline(self, handshake: _Handshake, part_id: str, wait_s: float) -> None:
        """No verdict from the daemon in time (it is down, the network): the part ends not_inspected here."""
        reason = f"deadline: no verdict from the daemon within {wait_s * 1000:.0f} ms of the trigger"
        await self._finish(handshake, part_id, "not_inspected", True, reason, 0.0)

    async def _part(self, handshake: _Handshake, header: dict) -> None:
        await self._finish(
            handshake,
            header["part_id"],
            header["verdict"],
            header["action"] == "reject",
            header["reason"],
            float(header["score"] or 0.0),
        )

    async def _finish(self, handshake: _Handshake, part_id: str, verdict: str, reject: bool, reason: str, score: float) -> None:
        """The part's verdict into the handshake's variables, Done last; once per part (the first wins)."""
        if handshake.pending != part_id and part_id:
            return
        handshake.pending = None
        if handshake.timer is not None:
            handshake.timer.cancel()
            handshake.timer = None
        await self._write_handshake(
            handshake,
            {"Verdict": verdict, "Reject": reject, "Reason": reason, "PartScore": score, "ResultPartId": part_id, "Done": True},
        )

    async def _write_handshake(self, handshake: _Handshake, values: dict) -> None:
        """The handshake's variables, stamped with the time they are written (there is no capture time to give)."""
        await self._write(handshake.variables, values, datetime.now(timezone.utc))

    async def apply(self, event: Event) -> None:
        """Write what one event says into its camera's variables."""
        line = self._line.get(event.endpoint, self.settings.mqtt.line)
        camera = await self._camera(line, event.camera)
        h = event.header
        if event.kind is EventKind.PART:
            handshake = self._handshakes.get((line, str(event.camera)))
            if handshake is not None and handshake.pending == h["part_id"]:
                await self._part(handshake, h)
            return
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
            model = h["model"] if isinstance(h.get("model"), dict) else {}
            await self._write(
                camera,
                {
                    "IsDefect": bool(h["is_defect"]),
                    "Score": float(h["score"]),
                    "CapturedAt": captured,
                    "EpisodeId": int(episode) if isinstance(episode, int) else 0,
                    "RunId": h["run_id"],
                    "Model": str(model.get("id", "")),
                    "ModelSha256": str(model.get("sha256", "")),
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
            variant = ua.Variant(value, getattr(ua.VariantType, _TYPES[name]))
            await camera.nodes[name].write_value(
                ua.DataValue(variant, SourceTimestamp=source_time, ServerTimestamp=datetime.now(timezone.utc))
            )
