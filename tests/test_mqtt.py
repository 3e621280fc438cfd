"""`inspectd bridge mqtt` against a real Mosquitto (127.0.0.1, authentication, persistence) and a real daemon.

The daemon archives every defect event, so the archive is the truth: every event it published must
reach an MQTT consumer, through a broker restart and a bridge restart mid-stream, at least once
(QoS 1); duplicates are counted and reported, never an event missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from mqtt_util import Mosquitto, Recorder
from support import ROOT, LateRelay, dies_with_tests, free_port, metric_value, wait_until

from inspectd.bridges.config import MqttConfig
from inspectd.bridges.mqtt import Positions, topics_for
from inspectd.client import decode_event
from inspectd.outputs.archive import RetentionIndex
from inspectd.outputs.wire import encode_message

pytestmark = pytest.mark.slow

USERS = {"bridge": "bridge-pw", "reader": "reader-pw"}


def _bridges_toml(tmp_path: Path, events: str, replay: str, port: int, **mqtt) -> Path:
    (tmp_path / "mqtt.password").write_text(USERS["bridge"] + "\n")
    os.chmod(tmp_path / "mqtt.password", 0o600)
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": "bridge-test",
        "username": "bridge",
        "password_file": "mqtt.password",
        "line": "line3",
        "state_file": "state/positions.json",
        "keepalive_s": 5,
        **mqtt,
    }
    path = tmp_path / "bridges.toml"
    path.write_text(
        f'[[daemons]]\nendpoint = "{events}"\nreplay = "{replay}"\nline = "line3"\n\n[mqtt]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    )
    return path


class Bridge:
    def __init__(self, config: Path, log: Path):
        self.log_path = log
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            dies_with_tests([sys.executable, "-m", "inspectd", "bridge", "mqtt", "--config", str(config)]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def _defects(recorder: Recorder) -> list[dict]:
    return [json.loads(p) for t, p, _ in recorder.snapshot() if t.endswith("/defect")]


def test_broker_and_bridge_restarts_lose_no_defect_event(tmp_path):
    """The bridge starts first; its connection to the daemon's events is let through (LateRelay) only once
    the daemon has published 2 defects: a run that began while the bridge ran is followed from seq 1, so
    those come through replay. (A bridge that took the run's first message as its baseline lost them:
    "missing [1]" on a slow CI machine, and "missing [1, 2]" here every time.)"""
    cams = camera_toml("cam-a", "synthetic://?fps=5&width=160&height=128&defect_rate=1&seed=4")
    replay = f"tcp://127.0.0.1:{free_port()}"
    config, urls = daemon_config(tmp_path, cams, replay={"endpoint": replay}, archive={"dir": str(tmp_path / "archive")})
    with Mosquitto(tmp_path / "broker", USERS) as broker, LateRelay(int(urls["events"].rsplit(":", 1)[1])) as relay:
        broker.wait_ready()
        bridges = _bridges_toml(tmp_path, f"tcp://127.0.0.1:{relay.port}", replay, broker.port)
        with Recorder(broker.port, "reader", USERS["reader"], "inspectd/#") as rec:
            wait_until(lambda: rec.client.is_connected(), 10, "the recorder connected")
            bridges_started = [Bridge(bridges, tmp_path / "bridge.log")]
            daemon = DaemonProcess(config, tmp_path / "daemon.log")
            try:
                daemon.wait_ready(urls["metrics"])
                wait_until(
                    lambda: (metric_value(urls["metrics"], "inspectd_events_published_total", topic="defect.cam-a") or 0) >= 2,
                    60,
                    "2 defects published before the bridge is let through",
                )
                relay.open()
                _restarts(rec, broker, bridges_started, daemon, urls, bridges, tmp_path)
            finally:
                for bridge in bridges_started:
                    bridge.stop(signal.SIGKILL)


def _restarts(
    rec: Recorder, broker: Mosquitto, bridges_started: list, daemon: DaemonProcess, urls: dict, bridges: Path, tmp_path: Path
) -> None:
    bridge = bridges_started[0]
    try:
        daemon.wait_ready(urls["metrics"])
        wait_until(lambda: len(_defects(rec)) >= 8, 60, lambda: f"8 defects over MQTT:\n{bridge_log(tmp_path)}")
        broker.restart()  # mid-stream: the bridge and the recorder reconnect to a broker that kept the session
        n = len(_defects(rec))
        wait_until(
            lambda: len(_defects(rec)) >= n + 8,
            60,
            lambda: f"8 more after the broker restart:\n{bridge_log(tmp_path)}\n{broker.log()}",
        )
        assert bridge.stop() == 0  # a bridge outage: what it missed comes from the daemon's replay
        n = len(_defects(rec))
        bridge = Bridge(bridges, tmp_path / "bridge.log")
        bridges_started.append(bridge)
        wait_until(lambda: len(_defects(rec)) >= n + 8, 60, lambda: f"8 more after the bridge restart:\n{bridge_log(tmp_path)}")
    finally:
        assert daemon.terminate() == 0
    index = RetentionIndex.scan(tmp_path / "archive")
    runs = {h["run_id"] for h in _defects(rec)}
    assert len(runs) == 1, runs
    (run,) = runs
    truth = {seq for seq, _ in index.published(run, "defect.cam-a", 0, 10**6)}
    assert len(truth) >= 24

    def missing() -> set[int]:
        return truth - {h["seq"] for h in _defects(rec)}

    wait_until(
        lambda: not missing(), 60, lambda: f"every archived defect over MQTT; missing {sorted(missing())}\n{bridge_log(tmp_path)}"
    )
    got = Counter(h["seq"] for h in _defects(rec))
    duplicates = sum(c - 1 for c in got.values())
    print(
        f"MQTT: {len(truth)} defect events published by the daemon, {len(got)} distinct received, "
        f"{duplicates} duplicate(s) (QoS 1 at least once), 0 missing"
    )
    assert set(got) == truth  # nothing invented either
    masks = {
        t.split("/")[5]
        for t, _, _ in rec.snapshot()
        if t.startswith(f"inspectd/line3/cam-a/defect/{run}/") and t.endswith("/mask")
    }
    assert masks == {str(seq) for seq in truth}  # every header's mask, on .../defect/RUN/SEQ/mask
    status = [json.loads(p) for t, p, _ in rec.snapshot() if t == "inspectd/line3/cam-a/status"]
    assert status and status[0]["state"] in ("up", "connecting")
    assert bridge.stop(signal.SIGKILL) == -signal.SIGKILL  # no goodbye: the broker sends the Last Will

    def bridge_states() -> list[str]:
        return [json.loads(p)["state"] for t, p, _ in rec.snapshot() if t == "inspectd/bridges/bridge-test/state"]

    wait_until(lambda: bridge_states()[-1:] == ["offline"], 30, lambda: f"the Last Will: {bridge_states()}")
    assert "online" in bridge_states()


def bridge_log(tmp_path: Path) -> str:
    path = tmp_path / "bridge.log"
    return path.read_text() if path.exists() else ""


def test_topics_and_payloads_of_a_defect_event(tmp_path):
    """What a consumer gets: the header with its line, then the mask (separate), or base64 inside (inline)."""
    from support import make_inspection

    from inspectd.outputs.wire import inspection_body

    insp = make_inspection(camera="top", attach_frame=True)
    body, attachments = inspection_body(insp, {"id": "top-model", "name": "m", "sha256": "0" * 64}, with_frame=True)
    event = decode_event(encode_message("defect.top", "run1", 7, body, attachments), decode=False)
    separate = topics_for(event, "line3", MqttConfig())
    assert [m.topic for m in separate] == [
        "inspectd/line3/top/defect",
        "inspectd/line3/top/defect/run1/7/mask",
        "inspectd/line3/top/defect/run1/7/frame",
        "inspectd/line3/top/defect/run1/7/regions",
    ]
    header = json.loads(separate[0].payload)
    assert (header["line"], header["run_id"], header["seq"], header["camera"]) == ("line3", "run1", 7, "top")
    assert header["model"] == {"id": "top-model", "name": "m", "sha256": "0" * 64}  # the model of the verdict
    assert separate[1].payload[:8] == b"\x89PNG\r\n\x1a\n"
    inline = topics_for(event, "line3", MqttConfig(frames="inline", topic_prefix="plant/a"))
    assert [m.topic for m in inline] == ["plant/a/line3/top/defect"]
    import base64

    assert base64.b64decode(json.loads(inline[0].payload)["attachments_base64"]["mask"]) == separate[1].payload


def test_positions_file_is_written_atomically_and_a_bad_one_is_a_clear_error(tmp_path):
    from inspectd.errors import DataError

    pos = Positions(tmp_path / "p.json")
    pos.advance("r", "defect.a", 3)
    pos.advance("r", "defect.a", 2)  # never backwards
    pos.save(force=True)
    assert json.loads((tmp_path / "p.json").read_text()) == {"r": {"defect.a": 3}}
    assert Positions(tmp_path / "p.json").value == {"r": {"defect.a": 3}}
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(DataError, match="state_file .*unreadable"):
        Positions(tmp_path / "p.json")


def _doc_example(heading: str) -> str:
    """The first python block after `heading` in docs/integration.md."""
    import re

    section = (ROOT / "docs" / "integration.md").read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_mqtt_consumer_runs_as_written(tmp_path, start_publisher):
    """docs/integration.md's paho example, only the broker's address and password changed, against the
    bridge fed by a real publisher: it prints each defect and saves the mask of that header's seq."""
    import cv2
    import numpy as np
    from support import make_inspection

    pub = start_publisher()
    code = _doc_example("Python (paho-mqtt 2), printing each defect and saving its mask")
    with Mosquitto(tmp_path / "broker", USERS) as broker:
        broker.wait_ready()
        code = code.replace('"secret"', json.dumps(USERS["reader"])).replace('"broker", 1883', f'"127.0.0.1", {broker.port}')
        assert str(broker.port) in code and USERS["reader"] in code
        (tmp_path / "consumer.py").write_text(code)
        bridge = Bridge(_bridges_toml(tmp_path, pub.endpoint, "", broker.port).resolve(), tmp_path / "bridge.log")
        out = open(tmp_path / "consumer.out", "w")
        consumer = subprocess.Popen(
            [sys.executable, str(tmp_path / "consumer.py")],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            insp = make_inspection(camera="top", seq=7)
            sent = 0

            def printed() -> str:
                return (tmp_path / "consumer.out").read_text()

            def published_and_printed() -> bool:  # the consumer subscribes when it connects: send until it shows
                nonlocal sent
                sent += 1
                pub.publish_inspection(insp, {"name": "m", "sha256": "0" * 64})
                return "line3 top" in printed()

            wait_until(
                published_and_printed,
                30,
                lambda: f"the consumer's first line:\n{printed()}\n{bridge_log(tmp_path)}",
                interval=0.3,
            )
            line = next(x for x in printed().splitlines() if x.startswith("line3 top"))
            words = line.split()
            assert words[:3] == ["line3", "top", pub.run_id[:8]] and words[3].isdigit() and "0.9" in line, line
            saved_as = tmp_path / f"top_{pub.run_id[:8]}_{words[3]}_mask.png"
            wait_until(saved_as.exists, 10, "its mask saved")
            masks = [saved_as]
            saved = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE)
            assert np.array_equal(saved, cv2.imdecode(np.frombuffer(insp.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE))
        finally:
            consumer.kill()
            consumer.wait()
            out.close()
            bridge.stop()


def test_a_bridge_started_while_a_camera_is_up_retains_its_status_and_stops_quietly(tmp_path, start_publisher):
    """No status event is ever published here (the camera was up before the bridge started): the state comes
    from the daemon's heartbeats, retained, so a consumer that connects later reads it at once. A clean stop
    logs no "lost the broker" warning."""
    pub = start_publisher(stats=lambda: {"cameras": {"top": "up"}})
    with Mosquitto(tmp_path / "broker", USERS) as broker:
        broker.wait_ready()
        bridge = Bridge(_bridges_toml(tmp_path, pub.endpoint, "", broker.port).resolve(), tmp_path / "bridge.log")
        try:
            with Recorder(broker.port, "reader", USERS["reader"], "inspectd/line3/+/status", client_id="early") as rec:

                def states() -> list[dict]:
                    return [json.loads(p) for t, p, _ in rec.snapshot() if t == "inspectd/line3/top/status"]

                wait_until(lambda: states(), 30, lambda: f"a status for 'top':\n{bridge_log(tmp_path)}")
                assert states()[0]["state"] == "up" and states()[0]["run_id"] == pub.run_id
            # One publication, not one per heartbeat (20 heartbeats a second here).
            with Recorder(broker.port, "reader", USERS["reader"], "inspectd/line3/+/status", client_id="late") as late:
                wait_until(lambda: late.snapshot(), 10, "the retained status for a consumer connecting later")
                assert [(json.loads(p)["state"], retained) for _, p, retained in late.snapshot()] == [("up", True)]
        finally:
            assert bridge.stop() == 0
    log = bridge_log(tmp_path)
    assert "WARNING" not in log and "lost the broker" not in log, log
