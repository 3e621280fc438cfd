"""The daemon end to end, as a subprocess: synthetic cameras -> demo model -> ZeroMQ events + metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port, http_get

from inspectd.client import Subscriber

pytestmark = pytest.mark.slow


def _metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _collect(sub: Subscriber, want: int, kind: str, timeout: float, cameras: set | None = None) -> list:
    """At least `want` events of `kind` (and from every camera in `cameras`), or what came by the timeout."""
    events, deadline = [], time.monotonic() + timeout

    def done() -> bool:
        return len(events) >= want and (cameras is None or {ev.camera for ev in events} >= cameras)

    while not done() and time.monotonic() < deadline:
        ev = sub.recv(timeout_s=1.0)
        if ev is not None and ev.kind.value == kind:
            events.append(ev)
    return events


def test_two_synthetic_cameras_publish_defects_and_metrics(tmp_path):
    cams = (camera_toml("cam-a", "synthetic://?fps=8&width=320&height=240&defect_rate=0.5&seed=1")
            + camera_toml("cam-b", "synthetic://?fps=8&width=320&height=240&defect_rate=0.5&seed=2"))
    config, urls = daemon_config(tmp_path, cams, publish={"results": True})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], topics=["defect.", "result.", "heartbeat"]) as sub:
            defects = _collect(sub, 6, "defect", timeout=60, cameras={"cam-a", "cam-b"})
            results = _collect(sub, 4, "result", timeout=30)
        assert len(defects) >= 6, daemon.log()
        for ev in defects:
            h = ev.header
            assert h["schema"] == "inspectd.event/1" and h["is_defect"] and h["score"] >= h["threshold"]
            assert ev.mask is not None and ev.mask.shape == (240, 320) and ev.mask.dtype == np.uint8
            assert h["frame"] == {"width": 320, "height": 240} and h["model"]["name"] == "demo"
            assert ev.gap == 0
        assert {ev.camera for ev in defects} == {"cam-a", "cam-b"}
        assert len(results) >= 4
        status, text = http_get(urls["metrics"] + "/metrics")
        assert status == 200
        for cam in ("cam-a", "cam-b"):
            assert _metric(text, "inspectd_camera_up", camera=cam) == 1.0
            assert _metric(text, "inspectd_frames_captured_total", camera=cam) > 0
            assert _metric(text, "inspectd_frames_inferred_total", camera=cam) > 0
            assert _metric(text, "inspectd_defects_total", camera=cam) > 0
        assert _metric(text, "inspectd_inference_seconds_count") > 0
        assert 'inspectd_model_info{backbone="efficientnetv2b0"' in text and "inspectd_build_info" in text
        assert _metric(text, "process_resident_memory_bytes") > 0
        assert http_get(urls["metrics"] + "/healthz")[0] == 200
        t0 = time.monotonic()
        assert daemon.terminate(timeout=30) == 0, daemon.log()
        assert time.monotonic() - t0 < 20
    assert "stopped" in daemon.log()


def test_dead_camera_does_not_stop_the_others(tmp_path):
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
    cams = (camera_toml("live", "synthetic://?fps=8&width=160&height=128&defect_rate=1&seed=3")
            + camera_toml("dead", dead, reconnect_initial_s=0.2, reconnect_max_s=1, open_timeout_s=1))
    config, urls = daemon_config(tmp_path, cams)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], topics=["defect.live"]) as sub:
            assert len(_collect(sub, 3, "defect", timeout=60)) == 3, daemon.log()
        text = http_get(urls["metrics"] + "/metrics")[1]
        assert _metric(text, "inspectd_camera_up", camera="dead") == 0.0
        assert _metric(text, "inspectd_camera_up", camera="live") == 1.0
        assert _metric(text, "inspectd_camera_reconnects_total", camera="dead") >= 1
        assert daemon.terminate() == 0
