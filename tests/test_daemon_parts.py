"""Part mode in a real `inspectd run`: a folder of parts, their verdicts on part.<camera> over real
ZeroMQ, the part log, `inspectd part`, and a kill -9 that loses nothing published."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port
from support import collect_events, wait_until

from inspectd.client import Subscriber
from inspectd.outputs.partlog import find_parts

pytestmark = pytest.mark.slow


def parts_folder(folder: Path, count: int, broken: tuple[int, ...] = ()) -> list[str]:
    """`count` noise images part-000.png...; the numbers in `broken` are files that are not images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"part-{i:03d}.png"
        if i in broken:
            (folder / name).write_bytes(b"not a png")
        else:
            cv2.imwrite(str(folder / name), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
        names.append(name)
    return names


def test_every_file_of_a_folder_is_a_part_with_one_verdict_logged_and_found(tmp_path):
    names = parts_folder(tmp_path / "parts", 12, broken=(5,))
    replay = f"tcp://127.0.0.1:{free_port()}"
    cameras = camera_toml("gate", f"dir://{tmp_path / 'parts'}?fps=20", loop=False, mode="parts", deadline_ms=5000)
    config, urls = daemon_config(tmp_path, cameras, replay={"endpoint": replay}, archive={"dir": str(tmp_path / "archive")})
    # Subscribed before the daemon starts: the run begins while it listens, so it follows it from seq 1 (replay fills).
    with Subscriber(urls["events"], ["part."], replay=replay) as sub:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            events = collect_events(sub, len(names), kinds=("part",), timeout=120, message=daemon.log)
            assert daemon.terminate() == 0, daemon.log()
    got = [(e.header["part_id"], e.header["verdict"], e.header["reason"]) for e in events]
    assert [part_id for part_id, _, _ in got] == names  # every file, once, in order
    assert got[5] == ("part-005.png", "not_inspected", "decode")
    assert all(verdict in ("ok", "defect") and not reason for i, (_, verdict, reason) in enumerate(got) if i != 5), got
    assert all(e.header["action"] == ("accept" if e.header["verdict"] == "ok" else "reject") for e in events)
    assert all(0 <= e.header["latency_ms"] < 5000 for e in events)

    logged = {line["part_id"]: line for name in names for line in find_parts(tmp_path / "archive", name)}
    assert sorted(logged) == names
    assert all(logged[e.header["part_id"]]["verdict"] == e.header["verdict"] for e in events)

    found = run_cli("part", "part-007.png", "--config", config)
    assert found.returncode == 0, found.stderr
    assert "part-007.png" in found.stdout and events[7].header["verdict"].upper() in found.stdout
    missing = run_cli("part", "part-999.png", "--config", config)
    assert missing.returncode == 66 and "not in the part log" in missing.stderr and "Traceback" not in missing.stderr


def test_kill_9_loses_no_published_part_from_the_part_log(tmp_path):
    """Every verdict a consumer received before the daemon was killed with SIGKILL is in the part log."""
    parts_folder(tmp_path / "parts", 20)
    cameras = camera_toml("gate", f"dir://{tmp_path / 'parts'}?fps=50", mode="parts")
    config, urls = daemon_config(tmp_path, cameras, archive={"dir": str(tmp_path / "archive")})
    with Subscriber(urls["events"], ["part."]) as sub:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            events = collect_events(sub, 60, kinds=("part",), timeout=120, message=daemon.log)
            os.kill(daemon.proc.pid, signal.SIGKILL)
            wait_until(lambda: daemon.proc.poll() is not None, 10, "the daemon to die")
            while (event := sub.recv(timeout_s=0.5)) is not None:  # what was on its way when it died
                if event.kind.value == "part":
                    events.append(event)
    logged = {(line["run_id"], line["frame_seq"]): line for line in _all_lines(tmp_path / "archive")}
    for event in events:
        line = logged.get((event.header["run_id"], event.header["frame_seq"]))
        assert line is not None, f"part {event.header['part_id']} (frame {event.header['frame_seq']}) published, not logged"
        assert (line["part_id"], line["verdict"]) == (event.header["part_id"], event.header["verdict"])


def _all_lines(root: Path):
    import json

    for path in sorted(root.glob("parts-*.jsonl")):
        for text in path.read_text().splitlines():
            yield json.loads(text)


def test_the_trigger_endpoint_names_the_next_part_and_refuses_clearly(tmp_path):
    """A camera that cannot be fired (a folder) takes the id of a trigger for its next frame; requests for a
    camera not in part mode, an unknown camera or malformed ones get one-line answers; a REQ client works."""
    import json

    import zmq

    from inspectd.client import TriggerClient
    from inspectd.outputs.wire import TRIGGER_TAG

    parts_folder(tmp_path / "parts", 4)
    trigger = f"tcp://127.0.0.1:{free_port()}"
    cameras = camera_toml("gate", f"dir://{tmp_path / 'parts'}?fps=2", mode="parts", deadline_ms=4000) + camera_toml(
        "web", "synthetic://?fps=2&width=64&height=48"
    )
    config, urls = daemon_config(tmp_path, cameras, trigger={"endpoint": trigger})
    with Subscriber(urls["events"], ["part.gate"]) as sub, TriggerClient(trigger, timeout_s=5) as triggers:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            daemon.wait_ready(urls["metrics"])
            answer = triggers.ask("gate", "A-1043")
            assert answer["status"] == "accepted" and answer["deadline_ms"] == 4000, answer
            tagged = collect_events(sub, lambda evs: any(e.header["part_id"] == "A-1043" for e in evs), kinds=("part",))
            (part,) = [e.header for e in tagged if e.header["part_id"] == "A-1043"]
            assert part["trigger_at"] == answer["trigger_at"] and part["verdict"] in ("ok", "defect")
            assert triggers.ask("web", "B-1")["reason"] == 'camera web is not in part mode (mode = "parts")'
            assert triggers.ask("nope", "B-2") == {
                "schema": "inspectd.trigger/1",
                "status": "refused",
                "camera": "nope",
                "part_id": "B-2",
                "reason": "no camera 'nope' runs here",
            }
            ctx = zmq.Context()
            req = ctx.socket(zmq.REQ)
            req.connect(trigger)
            req.send_multipart([TRIGGER_TAG, b'{"camera": "gate"}'])
            assert req.poll(5000), "no answer to a REQ client"
            tag, body = req.recv_multipart()
            assert tag == TRIGGER_TAG and json.loads(body)["reason"] == "part_id: 1-128 printable characters expected"
            req.close(linger=0)
            ctx.term()
            assert daemon.terminate() == 0, daemon.log()


def test_every_frame_of_a_video_file_is_a_part(tmp_path):
    """A video file in part mode (loop = false): each of its frames gets one verdict, numbered by capture."""
    video = tmp_path / "parts.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    rng = np.random.default_rng(1)
    for _ in range(8):
        writer.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    writer.release()
    replay = f"tcp://127.0.0.1:{free_port()}"
    cameras = camera_toml("film", str(video), loop=False, mode="parts", deadline_ms=5000)
    config, urls = daemon_config(tmp_path, cameras, replay={"endpoint": replay})
    with Subscriber(urls["events"], ["part."], replay=replay) as sub:
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            events = collect_events(sub, 8, kinds=("part",), timeout=120, message=daemon.log)
            assert daemon.terminate() == 0, daemon.log()
    assert [e.header["part_id"] for e in events] == [str(i) for i in range(1, 9)]
    assert all(e.header["verdict"] in ("ok", "defect") for e in events)
