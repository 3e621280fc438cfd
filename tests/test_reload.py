"""SIGHUP reload of a running daemon: model swap, invalid config kept out, a camera added."""

from __future__ import annotations

import signal
import time

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config, http_get
from test_notify import NotifySocket

from inspectd.client import Subscriber

pytestmark = pytest.mark.slow
CAM_A = camera_toml("cam-a", "synthetic://?fps=8&width=160&height=128&defect_rate=0.5&seed=1")
CAM_B = camera_toml("cam-b", "synthetic://?fps=8&width=160&height=128&defect_rate=0.5&seed=2")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, tf):
    """The demo model saved again under another name: a different file, a different sha256."""
    from inspectd.model.deployable import load_model, save_model
    from inspectd.service.config import resolve_model_path

    demo = load_model(resolve_model_path("builtin:demo"))
    path = tmp_path_factory.mktemp("models") / "demo-b.keras"
    save_model(demo.model, path, {**demo.meta, "name": "demo-b"})
    return path


def _events(sub: Subscriber, seconds: float, kind: str = "defect") -> list:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        ev = sub.recv(timeout_s=0.5)
        if ev is not None and ev.kind.value == kind:
            out.append(ev)
    return out


def _failures(urls) -> float:
    for line in http_get(urls["metrics"] + "/metrics")[1].splitlines():
        if line.startswith("inspectd_reload_failures_total "):
            return float(line.split()[1])
    raise AssertionError("inspectd_reload_failures_total missing")


def test_model_swap_keeps_events_flowing(tmp_path, second_model):
    config, urls = daemon_config(tmp_path, CAM_A)
    notify = NotifySocket(tmp_path / "n.sock")
    with DaemonProcess(config, tmp_path / "d.log", env={"NOTIFY_SOCKET": str(notify.path)}) as daemon, \
            Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        before = _events(sub, 3)
        assert before and all(ev.header["model"]["name"] == "demo" for ev in before)
        config.write_text(config.read_text().replace('path = "builtin:demo"', f'path = "{second_model}"'))
        daemon.proc.send_signal(signal.SIGHUP)
        deadline, after = time.monotonic() + 60, []
        while time.monotonic() < deadline and not after:
            after = [ev for ev in _events(sub, 1) if ev.header["model"]["name"] == "demo-b"]
        assert after, daemon.log()
        assert all(ev.gap == 0 and not ev.restarted for ev in before + after)  # same run, no loss
        assert after[0].header["run_id"] == before[0].header["run_id"]
        assert 'inspectd_model_info{backbone="efficientnetv2b0",input="160x128",name="demo-b"' in \
            http_get(urls["metrics"] + "/metrics")[1]
        notify.pump(0.5)
        lines = [m for _, m in notify.messages]
        assert lines.index("RELOADING=1") < len(lines) - 1 - lines[::-1].index("READY=1")
        assert _failures(urls) == 0
        assert daemon.terminate() == 0
    notify.close()


def test_invalid_config_or_model_is_kept_out(tmp_path):
    config, urls = daemon_config(tmp_path, CAM_A)
    good = config.read_text()
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        config.write_text(good + "\n[model\n")  # broken TOML
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert _failures(urls) == 1
        config.write_text(good.replace('path = "builtin:demo"', f'path = "{tmp_path / "missing.keras"}"'))
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert _failures(urls) == 2
        events = _events(sub, 3)
        assert events and all(ev.header["model"]["name"] == "demo" for ev in events)  # still the old model
        log = daemon.log()
        assert log.count("reload rejected, keeping the running config and model") == 2
        assert "not valid TOML" in log and "Traceback" not in log
        assert daemon.terminate() == 0


def test_camera_added_others_keep_streaming(tmp_path):
    config, urls = daemon_config(tmp_path, CAM_A)
    with DaemonProcess(config, tmp_path / "d.log") as daemon, \
            Subscriber(urls["events"], topics=["defect.", "status."]) as sub:
        daemon.wait_ready(urls["metrics"])
        first = _events(sub, 3)
        assert first
        config.write_text(config.read_text() + "\n" + CAM_B)
        daemon.proc.send_signal(signal.SIGHUP)
        events = _events(sub, 8)
        assert any(ev.camera == "cam-b" for ev in events), daemon.log()
        a_seqs = [first[-1].header["frame_seq"]] + [ev.header["frame_seq"] for ev in events if ev.camera == "cam-a"]
        assert a_seqs == sorted(a_seqs) and len(a_seqs) > 1  # cam-a was not restarted (its counter goes on)
        assert 'inspectd_camera_up{camera="cam-b"} 1.0' in http_get(urls["metrics"] + "/metrics")[1]
        assert daemon.terminate() == 0
