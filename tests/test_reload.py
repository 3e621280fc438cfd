"""SIGHUP reload of a running daemon: model and runtime swap, invalid config kept out, a camera added."""

from __future__ import annotations

import signal
import time

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import NotifySocket, collect_events, scrape, wait_until

from inspectd.client import Subscriber
from inspectd.outputs.wire import parse_rfc3339

pytestmark = pytest.mark.slow
CAM_A = camera_toml("cam-a", "synthetic://?fps=8&width=160&height=128&defect_rate=0.5&seed=1")
CAM_B = camera_toml("cam-b", "synthetic://?fps=8&width=160&height=128&defect_rate=0.5&seed=2")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, tf):
    """The demo model saved again under another name: a different file, a different sha256."""
    from inspectd.model.deployable import load_model, resolve_model_path, save_model

    demo = load_model(resolve_model_path("builtin:demo"))
    path = tmp_path_factory.mktemp("models") / "demo-b.keras"
    save_model(demo.model, path, {**demo.meta, "name": "demo-b"})
    return path


def _failures(urls) -> float:
    value = scrape(urls["metrics"]).value("inspectd_reload_failures_total")
    assert value is not None, "inspectd_reload_failures_total missing"
    return value


def _models(events) -> set[str]:
    return {ev.header["model"]["name"] for ev in events}


def test_model_swap_keeps_events_flowing(tmp_path, second_model):
    config, urls = daemon_config(tmp_path, CAM_A)
    config.write_text(config.read_text().replace('path = "builtin:demo"', 'path = "builtin:demo"\nruntime = "onnxruntime"'))
    notify = NotifySocket(tmp_path / "n.sock")
    with (
        DaemonProcess(config, tmp_path / "d.log", env={"NOTIFY_SOCKET": str(notify.path)}) as daemon,
        Subscriber(urls["events"], topics=["defect."]) as sub,
    ):
        daemon.wait_ready(urls["metrics"])
        before = collect_events(sub, 3, timeout=60, message=daemon.log)
        assert _models(before) == {"demo"}
        [info] = scrape(urls["metrics"]).find("inspectd_model_info")
        assert info.labels["runtime"] == "onnxruntime" and info.labels["device"] == "/CPU:0"
        # A new model file and another runtime in one reload (the new model is converted on the reload thread).
        new = f'path = "{second_model}"\nruntime = "openvino"'
        config.write_text(config.read_text().replace('path = "builtin:demo"\nruntime = "onnxruntime"', new))
        daemon.proc.send_signal(signal.SIGHUP)
        events = collect_events(sub, lambda evs: "demo-b" in _models(evs), timeout=60, message=daemon.log)
        after = [ev for ev in events if ev.header["model"]["name"] == "demo-b"]
        # Each event comes from the model that made it: the old one until the swap, the new one from then on.
        names = [ev.header["model"]["name"] for ev in before + events]
        assert names == sorted(names, key=lambda name: name == "demo-b"), names
        assert all(ev.gap == 0 and not ev.restarted for ev in before + events)  # same run, no loss
        assert after[0].header["run_id"] == before[0].header["run_id"]
        [info] = scrape(urls["metrics"]).find("inspectd_model_info")
        assert {
            "backbone": "efficientnet_lite0",
            "input": "160x128",
            "name": "demo-b",
            "runtime": "openvino",
        }.items() <= info.labels.items(), info
        # systemd saw RELOADING=1, then READY=1 again once the new model was serving.
        wait_until(
            lambda: notify.pump() or "READY=1" in notify.lines()[_index(notify.lines(), "RELOADING=1") + 1 :],
            10,
            lambda: f"READY=1 after RELOADING=1 on NOTIFY_SOCKET: {notify.lines()}",
        )
        assert _failures(urls) == 0
        assert daemon.terminate() == 0
    notify.close()


def _index(lines: list[str], line: str) -> int:
    return lines.index(line) if line in lines else len(lines)


def test_invalid_config_or_model_is_kept_out(tmp_path):
    config, urls = daemon_config(tmp_path, CAM_A)
    good = config.read_text()
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        config.write_text(good + "\n[model\n")  # broken TOML
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _failures(urls) == 1, 30, lambda: f"reload_failures_total == 1:\n{daemon.log()}", interval=0.2)
        config.write_text(good.replace('path = "builtin:demo"', f'path = "{tmp_path / "missing.keras"}"'))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _failures(urls) == 2, 60, lambda: f"reload_failures_total == 2:\n{daemon.log()}", interval=0.2)
        rejected_at = time.time()
        # Events keep coming, published after both rejections, from the old model.
        events = collect_events(
            sub,
            lambda evs: sum(parse_rfc3339(ev.header["published_at"]) > rejected_at for ev in evs) >= 3,
            timeout=30,
            message=daemon.log,
        )
        assert _models(events) == {"demo"}  # still the old model
        log = daemon.log()
        assert log.count("reload rejected, keeping the running config and model") == 2
        assert "not valid TOML" in log and "Traceback" not in log
        assert _failures(urls) == 2
        assert daemon.terminate() == 0


def test_camera_added_others_keep_streaming(tmp_path):
    config, urls = daemon_config(tmp_path, CAM_A)
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect.", "status."]) as sub:
        daemon.wait_ready(urls["metrics"])
        first = collect_events(sub, 1, timeout=60, message=daemon.log)
        config.write_text(config.read_text() + "\n" + CAM_B)
        daemon.proc.send_signal(signal.SIGHUP)

        def both_streaming(evs) -> bool:
            """a cam-b defect, and a cam-a defect after it"""
            b = next((i for i, ev in enumerate(evs) if ev.camera == "cam-b"), None)
            return b is not None and any(ev.camera == "cam-a" for ev in evs[b:])

        events = collect_events(sub, both_streaming, timeout=60, message=daemon.log)
        a_seqs = [first[-1].header["frame_seq"]] + [ev.header["frame_seq"] for ev in events if ev.camera == "cam-a"]
        assert a_seqs == sorted(a_seqs) and len(a_seqs) > 1  # cam-a was not restarted (its counter goes on)
        wait_until(
            lambda: scrape(urls["metrics"]).value("inspectd_camera_up", camera="cam-b") == 1.0,
            10,
            'inspectd_camera_up{camera="cam-b"} 1',
        )
        assert scrape(urls["metrics"]).value("inspectd_camera_up", camera="cam-a") == 1.0
        assert daemon.terminate() == 0


def test_a_camera_threshold_of_its_own_and_its_reload_without_a_camera_restart(tmp_path):
    """Two cameras seeing the same frames: one with threshold 0 of its own (every frame a defect), one with
    the model's. A reload that gives the second camera threshold 0 too applies at once (the context swaps) and
    restarts no camera."""
    url = "synthetic://?fps=10&width=96&height=64&defect_rate=0&seed=3"
    cameras = camera_toml("strict", url, threshold=0.0) + camera_toml("plain", url)
    config, urls = daemon_config(tmp_path, cameras)
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        before = collect_events(sub, lambda evs: sum(ev.camera == "strict" for ev in evs) >= 5, timeout=60, message=daemon.log)
        model_threshold = {ev.header["threshold"] for ev in before if ev.camera == "plain"}
        assert {ev.header["threshold"] for ev in before if ev.camera == "strict"} == {0.0}
        assert all(t > 0 for t in model_threshold), model_threshold  # plain: the model's (few events on clean frames)
        plain = f'id = "plain"\nurl = "{url}"'
        config.write_text(config.read_text().replace(plain, plain + "\nthreshold = 0.0"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("applied: cameras.plain.threshold", timeout=60)
        after = collect_events(
            sub, lambda evs: sum(ev.camera == "plain" and ev.header["threshold"] == 0.0 for ev in evs) >= 3, timeout=60
        )
        assert {ev.header["threshold"] for ev in after if ev.camera == "strict"} == {0.0}
        assert "cameras restarted" not in daemon.log() and daemon.log().count("camera plain: up") == 1
        assert daemon.terminate() == 0, daemon.log()
