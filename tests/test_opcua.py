"""`inspectd bridge opcua` (a process) fed by a real publisher, read by asyncua's own client.

Values change as events arrive; the latency from a verdict's publication to the variable's change
seen by a subscribed client is measured and printed (docs/integration.md records it). Security:
Basic256Sha256 SignAndEncrypt with certificates, and a trust list.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support import ROOT, dies_with_tests, free_port, make_inspection

from inspectd.bridges.opcua import NODE_VARIABLES
from inspectd.config import PublishConfig
from inspectd.metrics import Metrics
from inspectd.outputs.publish import Publisher

pytestmark = pytest.mark.slow

MODEL = {"id": "top-model", "name": "test", "sha256": "0" * 64}


@pytest.fixture()
def publisher():
    pub = Publisher(
        PublishConfig(endpoint="tcp://127.0.0.1:0", heartbeat_s=0.2),
        Metrics(CollectorRegistry()),
        run_id="run-opcua",
        model=MODEL,
    )
    pub.start()
    yield pub
    pub.stop()


class BridgeProcess:
    """`inspectd bridge opcua` on one daemon (line3); `daemon`: more of its [[daemons]] keys (trigger, parts)."""

    def __init__(self, tmp_path: Path, events: str, opcua: dict, daemon: dict | None = None):
        self.url = f"opc.tcp://127.0.0.1:{free_port()}/inspectd"
        config = tmp_path / "bridges.toml"
        config.write_text(
            f'[[daemons]]\nendpoint = "{events}"\nline = "line3"\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (daemon or {}).items())
            + f'\n[opcua]\nendpoint = "{self.url}"\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in opcua.items())
        )
        self.log_path = tmp_path / "opcua.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            dies_with_tests([sys.executable, "-m", "inspectd", "bridge", "opcua", "--config", str(config)]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


async def _connect(url: str, timeout: float = 30.0, application_uri: str = "", **security):
    """An asyncua Client connected to the bridge, retried until it listens (the process takes a moment)."""
    from asyncua import Client

    deadline = time.monotonic() + timeout
    while True:
        client = Client(url, timeout=5)
        if application_uri:  # must match the URI in its certificate
            client.application_uri = application_uri
        if security:
            await client.set_security(**security)
        try:
            await client.connect()
            return client
        except (OSError, asyncio.TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # polling for the server to listen, with a deadline


async def _node(client, name: str):
    from asyncua import ua

    ns = await client.get_namespace_index("urn:inspectd")
    return client.get_node(ua.NodeId(f"inspectd/line3/top/{name}", ns))


def test_verdicts_become_variables_and_the_latency_is_measured(tmp_path, publisher):
    bridge = BridgeProcess(tmp_path, publisher.endpoint, {})
    try:
        asyncio.run(_verdicts(bridge, publisher))
    finally:
        assert bridge.stop() == 0, bridge.log()


async def _verdicts(bridge: BridgeProcess, pub: Publisher) -> None:
    client = await _connect(bridge.url)
    try:
        # The camera's nodes appear with its first event.
        deadline = time.monotonic() + 30
        frame = 0
        while True:
            frame += 1
            pub.publish_inspection(make_inspection(camera="top", seq=frame, defect=False), MODEL, results=True)
            try:
                await (await _node(client, "FrameSeq")).read_value()
                break
            except Exception:  # BadNodeIdUnknown until the first event went through
                assert time.monotonic() < deadline, bridge.log()
                await asyncio.sleep(0.1)
        changes: asyncio.Queue = asyncio.Queue()

        class Handler:
            def datachange_notification(self, node, value, data):
                changes.put_nowait((time.monotonic(), value))

        sub = await client.create_subscription(10, Handler())
        frame_node = await _node(client, "FrameSeq")
        await sub.subscribe_data_change(frame_node)
        await asyncio.wait_for(changes.get(), 10)  # the current value
        sent: dict[int, float] = {}
        latencies = []
        defects = 0
        for i in range(40):
            frame += 1
            defect = i % 3 == 0
            defects += defect
            sent[frame] = time.monotonic()
            pub.publish_inspection(make_inspection(camera="top", seq=frame, defect=defect), MODEL, results=True)
            while True:
                seen_at, value = await asyncio.wait_for(changes.get(), 10)
                if value == frame:
                    latencies.append(seen_at - sent[frame])
                    break
            assert await (await _node(client, "IsDefect")).read_value() is defect
            await asyncio.sleep(0.05)  # a moderate rate: 20 verdicts/s at most
        inspected = await (await _node(client, "Inspected")).read_value()
        assert inspected == frame and await (await _node(client, "Defects")).read_value() == defects
        assert await (await _node(client, "RunId")).read_value() == "run-opcua"
        assert await (await _node(client, "Model")).read_value() == "top-model"  # the model of the verdict
        assert await (await _node(client, "ModelSha256")).read_value() == "0" * 64
        from asyncua import ua

        camera = client.get_node(ua.NodeId("inspectd/line3/top", await client.get_namespace_index("urn:inspectd")))
        assert {(await n.read_browse_name()).Name for n in await camera.get_children()} == set(NODE_VARIABLES)
        assert await (await _node(client, "State")).read_value() == "unknown"  # no status event was sent
        from asyncua.ua.uaerrors import BadNotWritable, BadUserAccessDenied

        with pytest.raises((BadUserAccessDenied, BadNotWritable)):  # read-only to clients
            await (await _node(client, "IsDefect")).write_value(True)
        # An older frame arriving late (or the same frame's other event) changes nothing.
        pub.publish_inspection(
            make_inspection(camera="top", seq=frame - 5, defect=True, captured_at=time.time() - 60), MODEL, results=True
        )
        frame += 1
        pub.publish_inspection(make_inspection(camera="top", seq=frame, defect=False), MODEL, results=True)
        while (await asyncio.wait_for(changes.get(), 10))[1] != frame:
            pass
        assert await (await _node(client, "IsDefect")).read_value() is False
        assert await (await _node(client, "Inspected")).read_value() == inspected + 1
        # The camera restarted (a reload): frame_seq starts again at 1, later in time: written.
        pub.publish_inspection(
            make_inspection(camera="top", seq=1, defect=True, captured_at=time.time() + 1), MODEL, results=True
        )
        while (await asyncio.wait_for(changes.get(), 10))[1] != 1:
            pass
        assert await (await _node(client, "IsDefect")).read_value() is True
    finally:
        await client.disconnect()
    # asyncua's default would make a client logged in as "admin" (any password) an administrator.
    from asyncua import Client

    admin = Client(bridge.url, timeout=5)
    admin.set_user("admin")
    admin.set_password("anything")
    await admin.connect()
    try:
        node = await _node(admin, "IsDefect")
        before = await node.read_value()
        with pytest.raises((BadUserAccessDenied, BadNotWritable)):
            await node.write_value(not before)
        assert await node.read_value() is before
    finally:
        await admin.disconnect()
    ms = sorted(x * 1000 for x in latencies)
    print(
        f"OPC UA: event -> variable change seen by a subscribed client (10 ms publishing interval), "
        f"{len(ms)} verdicts: median {statistics.median(ms):.1f} ms, p95 {ms[int(0.95 * len(ms)) - 1]:.1f} ms, "
        f"max {ms[-1]:.1f} ms"
    )
    assert ms[-1] < 5000


def _certificate(folder: Path, name: str, app_uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed application certificate (DER) and its key (PEM, 0600), as asyncua makes them."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "keys").mkdir(exist_ok=True)
    key, cert = folder.parent / "keys" / f"{name}.pem", folder / f"{name}.der"  # the trust list holds certificates only
    use = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    asyncio.run(setup_self_signed_certificate(key, cert, app_uri, "localhost", use, {"commonName": name}))
    key.chmod(0o600)
    return cert, key


def test_basic256sha256_sign_and_encrypt_admits_only_trusted_clients(tmp_path, publisher):
    from asyncua import ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    server_cert, server_key = _certificate(tmp_path / "server", "bridge", "urn:inspectd:bridge", server=True)
    plc_cert, plc_key = _certificate(tmp_path / "trusted", "plc", "urn:test:plc", server=False)
    odd_cert, odd_key = _certificate(tmp_path / "other", "stranger", "urn:test:stranger", server=False)
    bridge = BridgeProcess(
        tmp_path,
        publisher.endpoint,
        {
            "security": "sign_and_encrypt",
            "certificate": str(server_cert),
            "private_key": str(server_key),
            "trusted_clients": str(tmp_path / "trusted"),
        },
    )

    def secure(cert: Path, key: Path) -> dict:
        return {
            "policy": SecurityPolicyBasic256Sha256,
            "certificate": str(cert),
            "private_key": str(key),
            "server_certificate": str(server_cert),
            "mode": ua.MessageSecurityMode.SignAndEncrypt,
        }

    async def check() -> None:
        client = await _connect(bridge.url, application_uri="urn:test:plc", **secure(plc_cert, plc_key))
        try:
            deadline = time.monotonic() + 30
            frame = 0
            while True:  # the camera's nodes appear with its first event
                frame += 1
                pub_ok = make_inspection(camera="top", seq=frame, defect=True)
                publisher.publish_inspection(pub_ok, MODEL, results=True)
                try:
                    if await (await _node(client, "FrameSeq")).read_value() >= 1:
                        break
                except Exception:
                    assert time.monotonic() < deadline, bridge.log()
                    await asyncio.sleep(0.1)
            assert await (await _node(client, "IsDefect")).read_value() is True
        finally:
            await client.disconnect()
        from asyncua.ua.uaerrors import BadCertificateUntrusted, UaError

        with pytest.raises(UaError, match="No matching endpoints.*SecurityPolicy#None"):  # plain text: no endpoint
            await _connect(bridge.url, timeout=0)
        with pytest.raises(BadCertificateUntrusted):  # a certificate not in trusted_clients
            await _connect(bridge.url, timeout=0, application_uri="urn:test:stranger", **secure(odd_cert, odd_key))

    try:
        asyncio.run(check())
    finally:
        assert bridge.stop() == 0, bridge.log()
    assert "Traceback" not in bridge.log()


def test_a_private_key_others_can_read_is_refused(tmp_path, publisher):
    server_cert, server_key = _certificate(tmp_path / "server", "bridge", "urn:inspectd:bridge", server=True)
    server_key.chmod(0o644)
    bridge = BridgeProcess(
        tmp_path,
        publisher.endpoint,
        {"security": "sign_and_encrypt", "certificate": str(server_cert), "private_key": str(server_key)},
    )
    assert bridge.proc.wait(60) == 78
    assert "opcua.private_key" in bridge.log() and "chmod 600" in bridge.log()
    bridge.stop()


def test_the_documented_opcua_client_runs_as_written(tmp_path, publisher):
    """docs/integration.md's asyncua client, only the server's address changed, prints FrameSeq and IsDefect."""
    import re

    section = (ROOT / "docs" / "integration.md").read_text().split("reading the reject signal as a PLC would", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bridge = BridgeProcess(tmp_path, publisher.endpoint, {})
    code = code.replace("opc.tcp://linepc3:4840/inspectd", bridge.url)
    assert bridge.url in code
    try:

        async def first_verdict() -> None:
            client = await _connect(bridge.url)
            try:
                deadline = time.monotonic() + 30
                while True:
                    publisher.publish_inspection(make_inspection(camera="top", seq=42, defect=True), MODEL, results=True)
                    try:
                        if await (await _node(client, "FrameSeq")).read_value() == 42:
                            return
                    except Exception:  # BadNodeIdUnknown until the first event went through
                        pass
                    assert time.monotonic() < deadline, bridge.log()
                    await asyncio.sleep(0.1)
            finally:
                await client.disconnect()

        asyncio.run(first_verdict())
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.split() == ["42", "True"], run.stdout + run.stderr
    finally:
        assert bridge.stop() == 0, bridge.log()
