"""The consumer side against a real Publisher: inspectd.client, `inspectd watch`, and the documented example."""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from support import ROOT, TEST_MODEL, dies_with_tests, finishes_within, make_inspection, next_event, wait_connected

from inspectd.client import EventKind, SeqTracker, Subscriber, decode_event
from inspectd.errors import UsageError
from inspectd.frames import CameraState
from inspectd.outputs.wire import WireFormatError, encode_message, inspection_body, parse_rfc3339, status_body

MODEL = TEST_MODEL


def next_of(sub: Subscriber, kind: EventKind, timeout: float = 5.0):
    return next_event(sub, kind.value, timeout)


# -- pure: loss and restart detection ---------------------------------------------------------------


def test_seq_tracker_gaps_baseline_and_restart():
    t = SeqTracker()
    assert t.observe("A", "defect.cam1", 7) == (0, False)  # joined late: the baseline, not loss
    assert t.observe("A", "defect.cam1", 8) == (0, False)
    assert t.observe("A", "defect.cam1", 12) == (3, False)
    assert t.observe("A", "status.cam1", 1) == (0, False)  # topics are independent
    assert t.observe("A", "defect.cam1", 12) == (0, False)  # a duplicate is not loss
    assert t.observe("A", "defect.cam1", 13) == (0, False)
    assert t.observe("B", "heartbeat", 1, cameras=["cam1"]) == (0, True)  # a new run with A's camera: restarted
    assert t.observe("B", "defect.cam1", 2) == (0, False)
    assert t.observe("B", "defect.cam1", 4) == (1, False)


def test_seq_tracker_runs_interleaved_behind_a_proxy():
    """Daemons behind one proxy: each run counts on its own, none is a restart of another; a restart of
    one of them is still seen, by its cameras."""
    t = SeqTracker()
    assert t.observe("L1", "heartbeat", 1, cameras=["line1-top"]) == (0, False)
    assert t.observe("L2", "heartbeat", 1, cameras=["line2-top"]) == (0, False)
    assert t.observe("L1", "defect.line1-top", 1) == (0, False)
    assert t.observe("L2", "defect.line2-top", 1) == (0, False)
    assert t.observe("L1", "defect.line1-top", 2) == (0, False)
    assert t.observe("L2", "defect.line2-top", 4) == (2, False)  # L2's own gap, not L1's seqs
    assert t.observe("L1", "heartbeat", 2, cameras=["line1-top"]) == (0, False)
    assert t.observe("L2", "heartbeat", 3, cameras=["line2-top"]) == (1, False)
    assert t.observe("L1b", "status.line1-top", 1) == (0, True)  # line 1's daemon restarted
    assert t.observe("L2", "defect.line2-top", 5) == (0, False)  # line 2 goes on
    # A daemon's first heartbeat can come before its cameras start: the restart shows at its first camera.
    assert t.observe("L2b", "heartbeat", 1, cameras=[]) == (0, False)
    assert t.observe("L2b", "status.line2-top", 1) == (0, True)
    assert t.observe("L2b", "defect.line2-top", 1) == (0, False)


def test_seq_tracker_sees_a_shared_endpoint_when_runs_alternate():
    """Runs that alternate are several daemons (one daemon's runs never do): `shared`; a publisher that
    never names a camera is never taken for a restart; runs that name no camera yet are not restarts."""
    t = SeqTracker()
    assert t.observe("A", "heartbeat", 1) == (0, False)
    assert t.observe("B", "heartbeat", 1) == (0, False) and not t.shared
    assert t.observe("A", "heartbeat", 2) == (0, False) and t.shared
    assert [t.observe(r, "heartbeat", n)[1] for n in (2, 3, 4) for r in ("B", "A")] == [False] * 6
    assert t.observe("B", "heartbeat", 6) == (1, False)  # B's own gap is still seen
    assert t.observe("A", "status.a-top", 1) == (0, False)  # first cameras, nobody had them: no restart
    assert t.observe("B", "status.b-top", 1) == (0, False)


def test_decode_event_from_crafted_messages():
    insp = make_inspection(attach_frame=True)
    body, attachments = inspection_body(insp, MODEL, with_frame=True)
    ev = decode_event(encode_message("defect.cam1", "run", 3, body, attachments))
    assert (ev.topic, ev.kind, ev.header["seq"], ev.gap, ev.restarted) == ("defect.cam1", EventKind.DEFECT, 3, 0, False)
    assert np.array_equal(ev.mask, cv2.imdecode(np.frombuffer(insp.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE))
    bgr = cv2.imdecode(np.frombuffer(insp.frame_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(ev.frame, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    red = decode_event(
        encode_message(
            "defect.cam1",
            "run",
            4,
            *inspection_body(make_inspection(attach_frame=True, color=(200, 30, 30)), MODEL, with_frame=True),
        )
    )
    assert np.abs(red.frame.reshape(-1, 3).mean(axis=0) - (200, 30, 30)).max() < 5  # RGB, not BGR
    assert ev.raw == {"mask": insp.mask_png, "regions": insp.regions_png, "frame": insp.frame_jpeg}
    # The decoded regions mask is the header's regions: as many 255 pixels as their areas, each inside its box
    assert ev.regions_mask.shape == (48, 64) and set(np.unique(ev.regions_mask)) == {0, 255}
    assert int((ev.regions_mask == 255).sum()) == sum(r["area_px"] for r in ev.header["regions"]) > 0
    for r in ev.header["regions"]:
        x, y, w, h = r["bbox"]
        assert int((ev.regions_mask[y : y + h, x : x + w] == 255).sum()) >= r["area_px"]
    lazy = decode_event(encode_message("defect.cam1", "run", 3, body, attachments), decode=False)
    assert lazy.mask is None and lazy.frame is None and lazy.regions_mask is None and lazy.raw["mask"] == insp.mask_png
    with pytest.raises(WireFormatError):
        decode_event(encode_message("bogus.cam1", "run", 1, status_body("cam1", CameraState.UP)))


# -- Subscriber against a real Publisher ------------------------------------------------------------


def test_subscriber_receives_decoded_defects(start_publisher):
    pub = start_publisher(attach_frame=True)
    insp = make_inspection(attach_frame=True)
    with Subscriber(pub.endpoint, ["defect.", "heartbeat"]) as sub:
        hb = wait_connected(sub)
        assert (hb.restarted, hb.header["run_id"], hb.endpoint) == (False, pub.run_id, pub.endpoint)
        pub.publish_inspection(insp, MODEL)
        ev = next_of(sub, EventKind.DEFECT)
    assert (ev.topic, ev.camera, ev.gap, ev.restarted, ev.header["seq"]) == ("defect.cam1", "cam1", 0, False, 1)
    assert np.array_equal(ev.mask, cv2.imdecode(np.frombuffer(insp.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE))
    assert ev.frame.shape == insp.frame.image.shape and ev.raw["frame"] == insp.frame_jpeg
    assert sub.gaps == {}


def test_recv_times_out_with_none(start_publisher):
    pub = start_publisher()
    with Subscriber(pub.endpoint, ["defect."]) as sub:
        t0 = time.monotonic()
        # Nothing is published: recv waits its timeout (no less), then returns None instead of blocking.
        assert finishes_within(lambda: sub.recv(timeout_s=0.2), 10, "recv(timeout_s=0.2) with nothing published") is None
        assert time.monotonic() - t0 >= 0.19


def test_subscriber_detects_a_restart(start_publisher, tmp_path):
    """As a daemon restarts: the new run's first heartbeats name no camera yet (its cameras start after the
    publisher); the restart shows, once, on its first message that names one of the old run's cameras."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    first = start_publisher(endpoint, stats=lambda: {"cameras": {"cam1": "up"}})
    with Subscriber(endpoint, ["heartbeat", "status."]) as sub:
        wait_connected(sub)
        first.stop()
        cameras: dict = {}
        second = start_publisher(endpoint, stats=lambda: {"cameras": dict(cameras)})
        while (ev := sub.recv(timeout_s=5.0)).header["run_id"] != second.run_id:
            pass
        assert not ev.restarted and ev.gap == 0  # a heartbeat without cameras: not known yet
        second.publish_status("cam1", CameraState.UP)
        cameras["cam1"] = "up"
        ev = next_of(sub, EventKind.STATUS)
        assert (ev.restarted, ev.header["run_id"], ev.header["seq"]) == (True, second.run_id, 1)
        later = [sub.recv(timeout_s=5.0) for _ in range(5)]  # heartbeats naming cam1 now
        assert not any(e.restarted for e in later) and {e.header["run_id"] for e in later} == {second.run_id}


def test_one_subscriber_two_daemons_no_false_restarts(start_publisher):
    a, b = start_publisher(), start_publisher()
    with Subscriber([a.endpoint, b.endpoint], ["heartbeat"]) as sub:
        events = [sub.recv(timeout_s=2.0) for _ in range(20)]
    assert {ev.header["run_id"] for ev in events} == {a.run_id, b.run_id}
    assert {ev.endpoint for ev in events} == {a.endpoint, b.endpoint}
    assert not any(ev.restarted or ev.gap for ev in events)


def test_a_stuck_subscriber_loses_its_own_events_only_and_sees_the_gap(start_publisher):
    """ZeroMQ drops per subscriber: a live one gets every event; the stuck one sees the loss as a seq gap."""
    pub = start_publisher(send_hwm=20)
    insp = make_inspection()
    bulky = type(insp)(
        insp.frame, insp.score, insp.threshold, True, insp.regions, insp.mask_png + bytes(200_000), insp.mask_size
    )  # 200 kB each, so ZeroMQ's and the kernel's buffers overflow
    n = 150
    with (
        Subscriber(pub.endpoint, ["defect.", "heartbeat"], rcvhwm=1, decode=False) as stuck,
        Subscriber(pub.endpoint, ["defect.", "heartbeat"], decode=False) as live,
    ):
        wait_connected(stuck)
        wait_connected(live)
        received: list[int] = []
        for _ in range(n):  # in step with the live subscriber: it keeps up by construction
            pub.publish_inspection(bulky, MODEL)
            received.append(next_of(live, EventKind.DEFECT).header["seq"])
        assert received == list(range(1, n + 1))

        burst_end = time.time()
        stuck_seqs = []  # drain its backlog: FIFO, so it ends with the first heartbeat sent after the burst
        while (ev := stuck.recv(timeout_s=5.0)).kind is not EventKind.HEARTBEAT or parse_rfc3339(
            ev.header["published_at"]
        ) < burst_end:
            stuck_seqs += [ev.header["seq"]] if ev.kind is EventKind.DEFECT else []
        pub.publish_inspection(insp, MODEL)  # one more, after the stuck one caught up: the loss shows as a gap
        last = next_of(stuck, EventKind.DEFECT)
        assert last.header["seq"] == n + 1
        assert stuck_seqs[0] == 1 and len(stuck_seqs) < n
        # every defect event is either received or counted as missing:
        assert len(stuck_seqs) + 1 + stuck.gaps["defect.cam1"] == n + 1
    assert live.gaps == {}


def test_malformed_messages_are_skipped_and_counted():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with Subscriber(endpoint, [""]) as sub:
            for seq in range(1, 200):  # slow joiner: until one arrives
                pub.send_multipart(encode_message("heartbeat", "r", seq, {"fps": None, "cameras": {}, "uptime_s": 0.0}))
                if sub.recv(timeout_s=0.05) is not None:
                    break
            pub.send_multipart([b"defect.cam1", b"{not json"])
            pub.send_multipart(encode_message("status.cam1", "r", 1, status_body("cam1", CameraState.UP)))
            ev = sub.recv(timeout_s=2.0)
            assert (ev.topic, sub.malformed) == ("status.cam1", 1)
    finally:
        pub.close(0)
        ctx.term()


def test_bad_endpoint_is_a_usage_error():
    with pytest.raises(UsageError, match="foo://x"):
        Subscriber("foo://x")


# -- `inspectd watch` as a user runs it -------------------------------------------------------------


class Watch:
    """`python -m inspectd watch ARGS` in a subprocess, its output read line by line."""

    def __init__(self, *args: str, cwd: Path = ROOT, argv: list[str] | None = None):
        argv = argv or [sys.executable, "-m", "inspectd", "watch", *args]
        # SIGINT as at a terminal: a suite started in the background by a shell without job control
        # inherits SIGINT ignored, and a child would then (rightly) ignore Ctrl-C.
        self.proc = subprocess.Popen(
            dies_with_tests(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line.rstrip("\n"))

    def wait_for(self, needle: str, stream: str = "stdout", timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[stream].get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{needle!r} not in {stream}: {self.seen}") from None
            self.seen[stream].append(line)
            if needle in line:
                return line

    def finish(self, timeout: float = 10.0) -> tuple[int, list[str], list[str]]:
        rc = self.proc.wait(timeout=timeout)
        for reader in self.readers:  # they end at EOF, which follows the exit
            reader.join(timeout)
            assert not reader.is_alive(), "the output reader did not reach EOF"
        for name, lines in self.lines.items():
            while not lines.empty():
                self.seen[name].append(lines.get())
        return rc, self.seen["stdout"], self.seen["stderr"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def watch():
    started: list[Watch] = []

    def start(*args: str, **kw) -> Watch:
        started.append(Watch(*args, **kw))
        return started[-1]

    yield start
    for w in started:
        w.kill()


def test_watch_prints_events_and_saves_masks_and_overlays(start_publisher, watch, tmp_path):
    pub = start_publisher(attach_frame=True)
    w = watch(pub.endpoint, "--count", "3", "--save", str(tmp_path / "out"), "--timeout", "10")
    w.wait_for(f"connected to run {pub.run_id}")
    insps = [make_inspection(seq=1, attach_frame=True), make_inspection(seq=2)]
    for insp in insps:
        pub.publish_inspection(insp, MODEL)
    pub.publish_status("cam1", CameraState.DOWN, "stream ended")
    rc, out, err = w.finish()
    assert rc == 0, err
    events = [line for line in out if "connected" not in line]
    assert len(events) == 3, out
    assert re.search(
        r"defect\.cam1  camera cam1  frame 1  DEFECT score 0\.900 \(threshold 0\.50\)  regions 1  "
        r"largest \d+x\d+ at \d+,\d+$",
        events[0],
    ), events[0]
    assert "frame 2" in events[1] and events[2].endswith("status.cam1  camera cam1  down  (stream ended)")
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "cam1_1_frame.jpg",
        "cam1_1_mask.png",
        "cam1_1_overlay.png",
        "cam1_1_regions.png",
        "cam1_2_mask.png",
        "cam1_2_regions.png",
    ]
    assert (out_dir / "cam1_2_regions.png").read_bytes() == insps[1].regions_png
    assert (out_dir / "cam1_1_mask.png").read_bytes() == insps[0].mask_png
    assert (out_dir / "cam1_1_frame.jpg").read_bytes() == insps[0].frame_jpeg
    assert cv2.imread(str(out_dir / "cam1_1_overlay.png")).shape == (48, 64, 3)


def test_watch_prints_and_saves_an_episode_summary(start_publisher, watch, tmp_path):
    """An episode.<camera> message has no frame_seq: watch names its files by the episode (this once
    ended the demo's watch with a KeyError)."""
    from dataclasses import replace

    from inspectd.pipeline.episodes import Episode

    pub = start_publisher()
    w = watch(pub.endpoint, "--count", "1", "--save", str(tmp_path / "out"), "--timeout", "10")
    w.wait_for(f"connected to run {pub.run_id}")
    best = replace(make_inspection(seq=3), episode=4)
    pub.publish_episode(Episode("cam1", 4, best, best, best, 1, 1, "frames"), MODEL, best_event=False)
    rc, out, err = w.finish()
    assert rc == 0, err
    assert re.search(r"episode\.cam1  camera cam1  episode 4 ended \(frames\): 1 frames \(1 defective\)", out[-1]), out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cam1_episode4_mask.png", "cam1_episode4_regions.png"]


def test_watch_json_and_heartbeats(start_publisher, watch):
    pub = start_publisher()
    w = watch(pub.endpoint, "--json", "--topic", "heartbeat", "--count", "2")
    rc, out, err = w.finish()
    assert rc == 0, err
    headers = [json.loads(line) for line in out]
    assert [h["topic"] for h in headers] == ["heartbeat", "heartbeat"] and headers[0]["run_id"] == pub.run_id
    assert any(f"connected to run {pub.run_id}" in line for line in err)  # notices keep off the JSON stream


def test_watch_reports_gaps_and_restarts(watch):
    """A hand-driven PUB socket sends a crafted sequence: a restart, then a gap."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    try:
        w = watch(pub.getsockopt_string(zmq.LAST_ENDPOINT), "--count", "3")
        first, second = "a" * 32, "b" * 32
        for seq in range(1, 500):  # until watch has connected
            pub.send_multipart(encode_message("heartbeat", first, seq, {"fps": 1.0, "cameras": {}, "uptime_s": 1.0}))
            try:
                w.wait_for(f"connected to run {first}", timeout=0.05)
                break
            except AssertionError:
                pass
        body, parts = inspection_body(make_inspection(), MODEL, with_frame=False)
        pub.send_multipart(encode_message("status.cam1", first, 1, status_body("cam1", CameraState.UP)))
        pub.send_multipart(encode_message("defect.cam1", second, 1, body, parts))
        pub.send_multipart(encode_message("defect.cam1", second, 5, body, parts))
        rc, out, err = w.finish()
    finally:
        pub.close(0)
        ctx.term()
    assert rc == 0, err
    assert any(f"! daemon restarted, now run {second}" in line for line in out), out
    assert any("! 3 message(s) lost on defect.cam1 before seq 5" in line for line in out), out


def test_watch_timeout_and_bad_endpoint(watch):
    w = watch("tcp://127.0.0.1:9", "--timeout", "0.3")  # nothing listens there
    rc, out, err = w.finish()
    assert (rc, out) == (1, []) and err == ["inspectd watch: no event for 0.3 s from tcp://127.0.0.1:9"]
    rc, out, err = watch("nonsense://x").finish()
    assert rc == 2 and len(err) == 1 and err[0].startswith("inspectd watch: error: endpoint 'nonsense://x'")


def test_watch_replay_and_state_errors(watch, tmp_path):
    rc, out, err = watch("tcp://127.0.0.1:9", "--replay", "tcp://127.0.0.1:8", "--replay", "tcp://127.0.0.1:7").finish()
    assert rc == 2 and err == [
        "inspectd watch: error: 2 --replay endpoint(s) for 1 ENDPOINT(s): give one per ENDPOINT, in the same order"
    ]
    state = tmp_path / "state.json"
    for bad in ("{not json", '{"run": {"defect.a": "7"}}', "[1]"):
        state.write_text(bad)
        rc, out, err = watch("tcp://127.0.0.1:9", "--state", str(state), "--timeout", "0.2").finish()
        assert rc == 65 and len(err) == 1 and err[0].startswith(f"inspectd watch: error: --state {state}:"), err


def test_watch_exits_zero_on_ctrl_c(start_publisher, watch):
    pub = start_publisher()
    w = watch(pub.endpoint)
    w.wait_for("connected to run")
    w.proc.send_signal(signal.SIGINT)
    rc, _, err = w.finish(timeout=5)
    assert rc == 0, err
    assert not any("Traceback" in line for line in err)


# -- the consumer example of docs/wire-format.md runs as documented ----------------------------------


def doc_example() -> str:
    text = (ROOT / "docs" / "wire-format.md").read_text()
    section = text.split("## A consumer in a few lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_consumer_example_runs(start_publisher, watch, tmp_path):
    code = doc_example()
    imported = {
        alias.name for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names
    }
    assert imported == {"json", "sys", "cv2", "numpy", "zmq"}  # a consumer needs nothing of ours
    (tmp_path / "consumer.py").write_text(code)
    pub = start_publisher()
    w = watch(argv=[sys.executable, str(tmp_path / "consumer.py"), pub.endpoint], cwd=tmp_path)
    w.wait_for("heartbeat ")  # connected
    insp = make_inspection(camera="line1-top", seq=7)
    pub.publish_inspection(insp, MODEL)
    pub.publish_status("line1-top", CameraState.UP)
    assert w.wait_for("defect.line1-top") == "defect.line1-top 1 0.9"
    w.wait_for("status.line1-top 1")
    saved = cv2.imread(str(tmp_path / "line1-top_7_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(saved, cv2.imdecode(np.frombuffer(insp.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE))
    assert not any("lost" in line for line in w.seen["stdout"])
