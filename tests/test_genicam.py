"""GenICam cameras through Aravis, against Aravis' own fake GigE Vision camera: real GVCP/GVSP over UDP on
127.0.0.1 (`arv-fake-gv-camera-0.8`, Debian's aravis-tools; scripts/test.sh installs it). Not a mock:
the daemon discovers it, configures it over GenICam and software-triggers it per part.

Only one fake camera can listen on 127.0.0.1 (GVCP's port 3956): the fixture (conftest.py) runs one at a time.
"""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest
from conftest import DEVICE  # the fake camera's id (its fixture, fake_camera, is in conftest.py)
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port
from support import collect_events, metric_value, read_n

from inspectd.client import Subscriber
from inspectd.config import CameraConfig
from inspectd.sources.base import DecodeError, SourceError

pytestmark = pytest.mark.slow


def source(url: str, **extra):
    from inspectd.sources.genicam import GenicamSource

    return GenicamSource(CameraConfig(id="g", url=url, **extra))


def test_free_running_and_software_triggered_images_with_the_camera_settings(fake_camera):
    """Region, pixel format and exposure go to the camera; free running delivers frames, a software trigger
    exactly one image, with the camera's frame id and timestamp as its part id."""
    src = source(f"genicam://{DEVICE}?pixel_format=Mono8&region=0,0,320,200&exposure_us=2000&frame_rate=20")
    src.open()
    try:
        images = read_n(src, 3, timeout=20)
        assert all(im.shape == (200, 320, 3) and im.dtype == np.uint8 for im in images)
        assert src._camera.get_exposure_time() == pytest.approx(2000)
        assert src.period_s == 0.0  # free running: silence is a stall
    finally:
        src.close()
    src = source(f"genicam://{DEVICE}?trigger=software&pixel_format=Mono8&region=0,0,160,120")
    src.open()
    try:
        assert src.read(0.5) is None  # triggered: nothing without a trigger
        ids = []
        for _ in range(3):
            fired = src.fire()
            (image,) = read_n(src, 1)
            assert image.shape == (120, 160, 3)
            assert src.trigger_at == fired.at
            ids.append(src.part_id)
        frame_ids = [int(re.fullmatch(r"(\d+)@(\d+)", i)[1]) for i in ids]  # type: ignore[index]
        assert frame_ids == sorted(frame_ids) and len(set(ids)) == 3, ids
        assert src.period_s > 3600  # triggered from outside: silence between parts is no stall
    finally:
        src.close()


def test_bad_settings_and_a_missing_camera_are_one_line_errors(fake_camera):
    with pytest.raises(SourceError, match="no pixel format Mono12|pixel_format 'Mono12' is not one of"):
        source(f"genicam://{DEVICE}?pixel_format=Mono12").open()
    with pytest.raises(SourceError, match="trigger 'Line7' is not one of the camera's"):
        source(f"genicam://{DEVICE}?trigger=Line7").open()
    wired = source(f"genicam://{DEVICE}?trigger=Line0&pixel_format=Mono8")  # a hardware input the fake camera has
    wired.open()
    try:  # waiting for an edge that never comes here: UP (no stall), no image, no error
        assert wired.waits_for_triggers and wired.read(0.3) is None
        assert wired._camera.get_trigger_source() == "Line0"
    finally:
        wired.close()
    with pytest.raises(SourceError, match="cannot open the camera"):
        source("genicam://Aravis-Fake-NOSUCH").open()
    with pytest.raises(SourceError, match="unknown parameter"):
        source(f"genicam://{DEVICE}?expo=3")


def test_a_trigger_the_camera_never_answers_is_a_lost_frame(fake_camera):
    """A stopped camera (SIGSTOP) answers no trigger: after stall_timeout_s each is a drop with reason `camera`,
    with its trigger's time (the part it was fired for)."""
    from inspectd.frames import DropReason

    src = source(f"genicam://{DEVICE}?trigger=software&pixel_format=Mono8&region=0,0,160,120", stall_timeout_s=0.5)
    src.open()
    try:
        src.fire()
        read_n(src, 1)
        fake_camera.send_signal(signal.SIGSTOP)
        before = time.time()
        try:
            src.fire()
        except SourceError as exc:  # the camera does not acknowledge the trigger command
            assert "software trigger failed" in str(exc)
            (fired,) = src.abandon()  # the part it was fired for is handed to the worker: lost (`camera`)
            assert fired.at >= before
            return
        deadline = time.monotonic() + 10  # the command went through: the image never comes
        while True:
            assert time.monotonic() < deadline, "no lost-trigger report within 10 s"
            try:
                assert src.read(0.2) is None
            except DecodeError as exc:
                assert exc.reason is DropReason.CAMERA and src.trigger_at >= before and src.part_id is None
                break
    finally:
        fake_camera.send_signal(signal.SIGCONT)
        src.close()


def test_triggered_parts_from_a_genicam_camera_and_a_camera_that_stops_mid_run(fake_camera, tmp_path):
    """A real daemon triggers the fake camera 10 times a second in part mode: every part's verdict carries the
    camera's frame id and the trigger time. Stopped mid-run (SIGSTOP), the camera goes DOWN and the parts
    triggered meanwhile end not_inspected (`camera`); continued, it comes back UP and parts are inspected
    again. Every part still has exactly one verdict, and the frame accounts balance."""
    replay = f"tcp://127.0.0.1:{free_port()}"
    url = f"genicam://{DEVICE}?trigger=software&trigger_fps=10&pixel_format=Mono8&region=0,0,320,240"
    cameras = camera_toml(
        "line", url, mode="parts", deadline_ms=10000, stall_timeout_s=1, reconnect_initial_s=0.2, reconnect_max_s=1
    )
    config, urls = daemon_config(tmp_path, cameras, replay={"endpoint": replay}, archive={"dir": str(tmp_path / "archive")})
    with Subscriber(urls["events"], ["part.", "status."], replay=replay) as sub:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            first = collect_events(sub, 10, kinds=("part",), timeout=120, message=daemon.log)
            fake_camera.send_signal(signal.SIGSTOP)
            events = collect_events(
                sub,
                lambda evs: (
                    any(e.topic == "status.line" and e.header["state"] == "down" for e in evs)
                    and any(e.header.get("reason") == "camera" for e in evs)
                ),
                kinds=("part", "status"),
                timeout=60,
                message=daemon.log,
            )
            fake_camera.send_signal(signal.SIGCONT)
            events += collect_events(
                sub,
                lambda evs: sum(1 for e in evs if e.kind.value == "part" and e.header["verdict"] != "not_inspected") >= 5,
                kinds=("part", "status"),
                timeout=90,
                message=daemon.log,
            )
            parts = first + [e for e in events if e.kind.value == "part"]
            captured = metric_value(urls["metrics"], "inspectd_frames_captured_total", camera="line")
            assert daemon.terminate() == 0, daemon.log()
    ok = [e.header for e in first]
    assert all(re.fullmatch(r"\d+@\d+", h["part_id"]) and h["verdict"] in ("ok", "defect") for h in ok), ok
    assert all(h["trigger_at"] is not None and h["trigger_at"] <= h["captured_at"] for h in ok), ok
    lost = [e.header for e in parts if e.header["verdict"] == "not_inspected"]
    assert lost and all(h["reason"] == "camera" and h["action"] == "reject" for h in lost), lost
    seqs = [e.header["seq"] for e in parts]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # every verdict once, none missing, in order
    assert captured is not None and captured >= len(parts)
    assert "residual 0" in daemon.log() and "residual -" not in daemon.log()


def test_each_trigger_request_fires_the_camera_once_for_that_part(fake_camera, tmp_path):
    """Through the trigger endpoint, each {camera, part_id} fires one software trigger: one image, one verdict
    carrying that part id and the request's time; nothing is captured between requests."""
    from inspectd.client import TriggerClient

    trigger = f"tcp://127.0.0.1:{free_port()}"
    url = f"genicam://{DEVICE}?trigger=software&pixel_format=Mono8&region=0,0,320,240"
    # A deadline far beyond the model's time: on a loaded CI machine a slow inference must not turn a part into
    # not_inspected, which is not what this test is about.
    cameras = camera_toml("line", url, mode="parts", deadline_ms=10000)
    config, urls = daemon_config(tmp_path, cameras, trigger={"endpoint": trigger})
    with Subscriber(urls["events"], ["part."]) as sub, TriggerClient(trigger, timeout_s=5) as triggers:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            # A camera triggered only from outside is UP (and the daemon ready) once open, before its first image.
            daemon.wait_ready(urls["metrics"])
            verdicts = []
            for i in range(5):
                answer = triggers.ask("line", f"P-{i}")
                assert answer["status"] == "accepted", answer
                (event,) = collect_events(sub, 1, kinds=("part",), timeout=30, message=daemon.log)
                verdicts.append(event.header)
            captured = metric_value(urls["metrics"], "inspectd_frames_captured_total", camera="line")
            assert daemon.terminate() == 0, daemon.log()
    assert [h["part_id"] for h in verdicts] == [f"P-{i}" for i in range(5)]
    got = [(h["verdict"], h["reason"], h["trigger_at"]) for h in verdicts]
    assert all(verdict in ("ok", "defect") and trigger_at for verdict, _, trigger_at in got), got
    assert captured == 5  # one image per trigger, none between
