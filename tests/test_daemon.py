"""The daemon end to end, as a subprocess: synthetic cameras -> demo model -> ZeroMQ events + metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import collect_events, free_port, http_get, scrape, wait_until

from inspectd.client import Subscriber

pytestmark = pytest.mark.slow


def _from_cameras(n: int, cameras: set[str]):
    def done(events) -> bool:
        return len(events) >= n and {ev.camera for ev in events} >= cameras

    done.__doc__ = f"{n} events, from each of {sorted(cameras)}"
    return done


def test_two_synthetic_cameras_publish_defects_and_metrics(tmp_path):
    cams = camera_toml("cam-a", "synthetic://?fps=8&width=320&height=240&defect_rate=0.5&seed=1") + camera_toml(
        "cam-b", "synthetic://?fps=8&width=320&height=240&defect_rate=0.5&seed=2"
    )
    config, urls = daemon_config(tmp_path, cams, publish={"results": True})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], topics=["defect.", "result.", "heartbeat"]) as sub:
            defects = collect_events(sub, _from_cameras(6, {"cam-a", "cam-b"}), "defect", timeout=60, message=daemon.log)
            results = collect_events(sub, 4, "result", timeout=30, message=daemon.log)
        for ev in defects:
            h = ev.header
            assert h["schema"] == "inspectd.event/1" and h["is_defect"] and h["score"] >= h["threshold"]
            assert ev.mask is not None and ev.mask.shape == (240, 320) and ev.mask.dtype == np.uint8
            assert h["frame"] == {"width": 320, "height": 240} and h["model"]["name"] == "demo"
            assert ev.gap == 0
        assert {ev.camera for ev in defects} == {"cam-a", "cam-b"}
        assert all(ev.header["is_defect"] == (ev.header["score"] >= ev.header["threshold"]) for ev in results)
        m = scrape(urls["metrics"])
        for cam in ("cam-a", "cam-b"):
            assert m.value("inspectd_camera_up", camera=cam) == 1.0
            assert m.value("inspectd_frames_captured_total", camera=cam) > 0
            assert m.value("inspectd_frames_inferred_total", camera=cam) > 0
            # Every defect event this subscriber got was counted (more may have been sent before it joined).
            assert m.value("inspectd_defects_total", camera=cam) >= sum(ev.camera == cam for ev in defects)
        assert m.value("inspectd_inference_seconds_count", model="default") > 0  # [model]: the model "default"
        [info] = m.find("inspectd_model_info")
        assert info.labels["model"] == "default"
        assert {s.labels["camera"]: s.labels["model"] for s in m.find("inspectd_camera_info")} == {
            "cam-a": "default",
            "cam-b": "default",
        }
        assert info.labels["backbone"] == "efficientnet_lite0" and info.labels["name"] == "demo"
        # runtime auto: measured at the first start (the table in the label, the winner first), float32 by default
        assert info.labels["precision"] == "float32" and info.labels["auto"].startswith(info.labels["runtime"])
        assert info.labels["runtime"] in ("onnxruntime", "openvino", "tensorflow") and "/s" in info.labels["auto"]
        assert {(ev.header["model"]["runtime"], ev.header["model"]["precision"]) for ev in defects} == {
            (info.labels["runtime"], "float32")
        }
        assert m.find("inspectd_build_info")
        assert m.value("process_resident_memory_bytes") > 0
        assert http_get(urls["metrics"] + "/healthz")[0] == 200
        assert daemon.terminate(timeout=30) == 0, daemon.log()  # SIGTERM: a clean exit within the deadline
    assert "stopped" in daemon.log()


def test_dead_camera_does_not_stop_the_others(tmp_path):
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
    cams = camera_toml("live", "synthetic://?fps=8&width=160&height=128&defect_rate=1&seed=3") + camera_toml(
        "dead", dead, reconnect_initial_s=0.2, reconnect_max_s=1, open_timeout_s=1
    )
    config, urls = daemon_config(tmp_path, cams)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], topics=["defect.live"]) as sub:
            collect_events(sub, 3, "defect", timeout=60, message=daemon.log)
            # The dead camera keeps retrying (refused at once, then the backoff) ...
            wait_until(
                lambda: scrape(urls["metrics"]).value("inspectd_camera_reconnects_total", camera="dead") >= 2,
                30,
                lambda: f"the dead camera to retry twice:\n{daemon.log()}",
                interval=0.1,
            )
            # ... while the live one goes on publishing.
            collect_events(sub, 3, "defect", timeout=30, message=daemon.log)
        m = scrape(urls["metrics"])
        assert m.value("inspectd_camera_up", camera="dead") == 0.0
        assert m.value("inspectd_camera_up", camera="live") == 1.0
        assert daemon.terminate() == 0


def test_a_daemon_whose_cameras_deliver_nothing_is_healthy_but_not_ready(tmp_path):
    """Ready means inspecting: with its only camera unreachable the daemon is up and healthy (its loops run;
    systemd must not restart it) and /readyz says what it waits for."""
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
    config, urls = daemon_config(
        tmp_path, camera_toml("dead", dead, reconnect_initial_s=0.2, reconnect_max_s=1, open_timeout_s=1)
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_log("ready: 1 camera(s)", timeout=120)
        wait_until(lambda: http_get(urls["metrics"] + "/healthz")[0] == 200, 30, lambda: daemon.log())
        status, body = http_get(urls["metrics"] + "/readyz")
        assert status == 503 and "waiting for a first frame" in body and "dead:" in body, body
        assert daemon.terminate() == 0


class _StuckWorker:
    """A capture thread stuck in its backend (an OpenCV read on a frozen stream): join() times out."""

    def __init__(self, calls: list):
        self.calls = calls

    def stop(self) -> None:
        self.calls.append("stop")

    def join(self, timeout: float) -> bool:
        self.calls.append(timeout)
        time.sleep(timeout)
        return False


class _Pipeline:
    def __init__(self):
        self.removed = []

    def remove_camera(self, camera: str, reason: str) -> None:
        self.removed.append((camera, reason))


def test_stuck_cameras_share_one_shutdown_timeout(caplog):
    """Three cameras stuck in their backends: all are told to stop first, then waited for against one
    deadline, so the wait is shutdown_timeout_s in all (not once per camera) and each is still removed."""
    from inspectd.config import CameraConfig, DaemonConfig, Settings
    from inspectd.service.daemon import Daemon

    settings = Settings(cameras=[CameraConfig(id="a", url="synthetic://")], daemon=DaemonConfig(shutdown_timeout_s=0.3))
    daemon = Daemon(settings)
    calls: list = []
    daemon.cameras = {cam: _StuckWorker(calls) for cam in ("a", "b", "c")}
    daemon.pipeline = _Pipeline()
    daemon._stop_all_cameras()
    assert calls[:3] == ["stop"] * 3  # every camera told before any wait
    waits = [c for c in calls if not isinstance(c, str)]
    assert len(waits) == 3 and sum(waits) <= 0.3 + 0.05, waits
    assert daemon.pipeline.removed == [("a", "shutdown"), ("b", "shutdown"), ("c", "shutdown")]
    assert caplog.text.count("still blocked in its backend") == 3 and daemon.cameras == {}
