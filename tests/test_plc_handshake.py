"""The PLC handshake (docs/parts.md#the-plc-handshake-over-opc-ua), end to end with real parts: asyncua's
client plays the PLC against `inspectd bridge opcua`, which asks a real `inspectd run` for each part
through its trigger endpoint; the daemon fires Aravis' fake GigE Vision camera (real GVCP/GVSP on
127.0.0.1) and publishes each part's verdict. Then the camera stops and the daemon is killed with a
part in flight: the PLC still gets a verdict, not_inspected, by the deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from conftest import DEVICE
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port
from test_opcua import BridgeProcess, _connect

pytestmark = pytest.mark.slow

DEADLINE_MS = 3000  # well beyond the model's time on a loaded CI machine; the bridge's deadline is still checked
MARGIN_MS = 250


class Plc:
    """What a PLC program does, through asyncua's client: write PartId, set Trigger, wait for Done, read, reset."""

    def __init__(self, client, ns: int):
        from asyncua import ua

        self.ua = ua
        self.node = {
            name: client.get_node(ua.NodeId(f"inspectd/line3/line/{name}", ns))
            for name in ("PartId", "Trigger", "Done", "Verdict", "Reject", "Reason", "ResultPartId", "PartScore")
        }

    async def write(self, name: str, value, kind: str) -> None:
        ua = self.ua
        await self.node[name].write_value(ua.DataValue(ua.Variant(value, getattr(ua.VariantType, kind))))

    async def wait(self, name: str, value, timeout: float) -> float:
        """Poll `name` until it equals `value` (a PLC scan, every 5 ms); seconds waited."""
        start = time.monotonic()
        while await self.node[name].read_value() != value:
            assert time.monotonic() - start < timeout, f"{name} != {value!r} after {timeout} s"
            await asyncio.sleep(0.005)
        return time.monotonic() - start

    async def inspect(self, part_id: str, timeout: float = 10.0) -> dict:
        await self.write("PartId", part_id, "String")
        await self.write("Trigger", True, "Boolean")
        waited = await self.wait("Done", True, timeout)
        result = {name: await self.node[name].read_value() for name in ("Verdict", "Reject", "Reason", "ResultPartId")}
        await self.write("Trigger", False, "Boolean")
        await self.wait("Done", False, 5)
        return {**result, "waited_s": waited}


def test_a_plc_asks_for_each_part_and_gets_its_verdict_or_not_inspected_at_the_deadline(fake_camera, tmp_path):
    trigger = f"tcp://127.0.0.1:{free_port()}"
    url = f"genicam://{DEVICE}?trigger=software&pixel_format=Mono8&region=0,0,320,240"
    cameras = camera_toml("line", url, mode="parts", deadline_ms=DEADLINE_MS, stall_timeout_s=1)
    config, urls = daemon_config(tmp_path, cameras, trigger={"endpoint": trigger})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        bridge = BridgeProcess(
            tmp_path, urls["events"], {"deadline_margin_ms": MARGIN_MS}, daemon={"trigger": trigger, "parts": ["line"]}
        )
        try:
            results = asyncio.run(_plc(bridge, daemon, fake_camera))
        finally:
            assert bridge.stop() == 0, bridge.log()
    inspected, stopped, dead = results
    print("PLC trigger -> Done (ms):", [round(r["waited_s"] * 1000) for r in inspected])
    for i, r in enumerate(inspected):
        assert r["ResultPartId"] == f"P-{i}" and r["Verdict"] in ("ok", "defect"), r
        assert r["Reject"] == (r["Verdict"] == "defect") and r["Reason"] == ""
    # The camera stopped, then the daemon killed with the part in flight: the bridge's deadline answers.
    assert stopped["ResultPartId"] == "P-stop" and stopped["Verdict"] == "not_inspected" and stopped["Reject"] is True
    assert stopped["Reason"].startswith("deadline: no verdict from the daemon"), stopped
    assert stopped["waited_s"] < (DEADLINE_MS + MARGIN_MS) / 1000 + 1.0, stopped
    # The daemon is gone: the trigger is unanswered, and the part not_inspected at once (1 s: the request's timeout).
    assert dead["Verdict"] == "not_inspected" and dead["Reason"].startswith("trigger unanswered"), dead


async def _plc(bridge: BridgeProcess, daemon: DaemonProcess, camera):
    client = await _connect(bridge.url)
    try:
        plc = Plc(client, await client.get_namespace_index("urn:inspectd"))
        deadline = time.monotonic() + 30
        while True:  # the handshake nodes exist from the bridge's start
            try:
                await plc.node["Done"].read_value()
                break
            except Exception:
                assert time.monotonic() < deadline, bridge.log()
                await asyncio.sleep(0.1)
        inspected = [await plc.inspect(f"P-{i}") for i in range(5)]
        camera.send_signal(signal.SIGSTOP)
        try:
            await plc.write("PartId", "P-stop", "String")
            await plc.write("Trigger", True, "Boolean")
            await asyncio.sleep(0.2)  # the trigger is accepted and fired at the stopped camera: the part is in flight
            os.kill(daemon.proc.pid, signal.SIGKILL)
            waited = await plc.wait("Done", True, 10) + 0.2
            stopped = {n: await plc.node[n].read_value() for n in ("Verdict", "Reject", "Reason", "ResultPartId")}
            stopped["waited_s"] = waited
            await plc.write("Trigger", False, "Boolean")
            await plc.wait("Done", False, 5)
        finally:
            camera.send_signal(signal.SIGCONT)
        dead = await plc.inspect("P-dead")
        return inspected, stopped, dead
    finally:
        await client.disconnect()


def test_handshake_config_needs_the_trigger_endpoint(tmp_path):
    from conftest import run_cli

    config = tmp_path / "bridges.toml"
    config.write_text('[[daemons]]\nendpoint = "tcp://127.0.0.1:5556"\nparts = ["line"]\n')
    run = run_cli("bridge", "opcua", "--config", config)
    assert run.returncode == 78 and "need its trigger endpoint" in run.stderr, run.stderr
