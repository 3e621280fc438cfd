"""The publisher against real ZeroMQ SUB sockets on 127.0.0.1: the wire format, seq, heartbeats, never blocking."""

from __future__ import annotations

import re
import threading
import time
import uuid
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from inspectd.errors import ConfigError
from inspectd.frames import CameraState, Frame, Inspection
from inspectd.outputs.publish import Publisher
from inspectd.outputs.wire import (
    SCHEMA,
    WireFormatError,
    decode_message,
    encode_message,
    parse_rfc3339,
    rfc3339,
    status_body,
)
from inspectd.pipeline.postprocess import InspectOptions, inspect
from inspectd.service.config import PublishConfig
from inspectd.service.metrics import Metrics

MODEL = {"name": "tiny", "sha256": "ab" * 32}
RFC3339_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# -- helpers shared with test_client.py ----------------------------------------------------------


def make_inspection(camera: str = "cam1", seq: int = 1, defect: bool = True, attach_frame: bool = False,
                    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] | None = None) -> Inspection:
    """A real post-processed inspection: one hot square in the CAM -> one region, a mask PNG, maybe a JPEG.

    The frame is noise, or one RGB `color`."""
    w, h = size
    if color is None:
        image = np.random.default_rng(seq).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        image = np.full((h, w, 3), color, np.uint8)
    frame = Frame(camera, seq, time.time() - 0.05, time.monotonic(), image)
    logits = np.full((h // 8, w // 8), -6.0, np.float32)
    logits[2:4, 3:5] = 6.0
    opts = InspectOptions(threshold=0.5, mask_threshold=0.5, attach_frame=attach_frame, results=True)
    return inspect(frame, 0.9 if defect else 0.1, logits, opts)


def sample(pub: Publisher, name: str, topic: str) -> float:
    return pub.metrics.registry.get_sample_value(f"inspectd_{name}_total", {"topic": topic}) or 0.0


@pytest.fixture()
def start_publisher():
    """start_publisher(**PublishConfig fields) -> a started Publisher (heartbeat 50 ms), stopped at teardown."""
    started: list[Publisher] = []

    def start(endpoint: str = "tcp://127.0.0.1:0", run_id: str | None = None, stats=dict, **cfg) -> Publisher:
        cfg = {"heartbeat_s": 0.05, **cfg}
        pub = Publisher(PublishConfig(endpoint=endpoint, **cfg), Metrics(CollectorRegistry()),
                        run_id or uuid.uuid4().hex, MODEL, stats)
        pub.start()
        started.append(pub)
        return pub

    yield start
    for pub in started:
        pub.stop(timeout=0.5)


@contextmanager
def subscribed(endpoint: str, *topics: str, rcvhwm: int = 1000):
    """A raw SUB socket, returned only once it is connected (slow joiner: a heartbeat has arrived)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for topic in (*topics, "heartbeat"):
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    try:
        while receive(sock, timeout=5.0)[0] != "heartbeat":
            pass
        yield sock
    finally:
        sock.close()
        ctx.term()


def receive(sock: zmq.Socket, timeout: float = 2.0) -> tuple[str, dict, list[bytes]]:
    assert sock.poll(int(timeout * 1000)), f"nothing received within {timeout} s"
    return decode_message(sock.recv_multipart())


def receive_data(sock: zmq.Socket, n: int, timeout: float = 5.0) -> list[tuple[str, dict, list[bytes]]]:
    """The next n messages that are not heartbeats."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        msg = receive(sock, max(0.01, deadline - time.monotonic()))
        if msg[0] != "heartbeat":
            out.append(msg)
    return out


# -- pure functions ---------------------------------------------------------------------------------


def test_rfc3339_is_utc_with_microseconds_and_round_trips():
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"
    now = time.time()
    assert RFC3339_US.match(rfc3339(now))
    assert parse_rfc3339(rfc3339(now)) == pytest.approx(now, abs=1e-6)


def test_encode_decode_round_trip_and_malformed_messages():
    parts = encode_message("status.cam1", "r1", 7, status_body("cam1", CameraState.DOWN, "timeout"), published_at=1.0)
    topic, header, attachments = decode_message(parts)
    assert (topic, attachments) == ("status.cam1", [])
    assert header == {"schema": SCHEMA, "run_id": "r1", "topic": "status.cam1", "seq": 7,
                      "published_at": "1970-01-01T00:00:01.000000Z", "camera": "cam1", "state": "down",
                      "detail": "timeout", "attachments": []}
    good_header = parts[1]
    for bad in ([b"defect.cam1"], [b"defect.cam1", b"{not json"], [b"defect.cam1", b"[1]"],
                [b"defect.cam1", good_header.replace(b"inspectd.event/1", b"inspectd.event/2")],
                [b"defect.cam1", good_header, b"an attachment the header does not name"]):
        with pytest.raises(WireFormatError):
            decode_message(bad)


# -- against real sockets -------------------------------------------------------------------------


def test_defect_event_header_and_attachments(start_publisher):
    pub = start_publisher(attach_frame=True)
    insp = make_inspection(attach_frame=True)
    assert insp.is_defect and insp.regions and insp.mask_png and insp.frame_jpeg
    with subscribed(pub.endpoint, "defect.") as sub:
        pub.publish_inspection(insp, MODEL)
        [(topic, h, attachments)] = receive_data(sub, 1)

    assert topic == "defect.cam1"
    assert set(h) == {"schema", "run_id", "topic", "seq", "published_at", "camera", "frame_seq", "captured_at", "score",
                      "threshold", "is_defect", "model", "regions", "frame", "attachments"}
    assert (h["schema"], h["run_id"], h["topic"], h["seq"]) == (SCHEMA, pub.run_id, "defect.cam1", 1)
    assert (h["camera"], h["frame_seq"], h["is_defect"], h["model"]) == ("cam1", 1, True, MODEL)
    assert isinstance(h["score"], float) and h["score"] == pytest.approx(0.9)
    assert isinstance(h["threshold"], float) and h["threshold"] == 0.5
    assert RFC3339_US.match(h["captured_at"]) and RFC3339_US.match(h["published_at"])
    assert h["captured_at"] == rfc3339(insp.frame.captured_at)
    assert 0 <= parse_rfc3339(h["published_at"]) - parse_rfc3339(h["captured_at"]) < 5
    assert h["frame"] == {"width": 64, "height": 48}
    assert h["regions"] == [r.as_dict() for r in insp.regions]
    region = h["regions"][0]
    assert all(isinstance(v, int) for v in region["bbox"]) and isinstance(region["area_px"], int)
    assert h["attachments"] == [{"kind": "mask", "encoding": "png", "width": 64, "height": 48},
                                {"kind": "frame", "encoding": "jpeg", "width": 64, "height": 48}]
    assert attachments == [insp.mask_png, insp.frame_jpeg]
    mask = cv2.imdecode(np.frombuffer(attachments[0], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (48, 64) and mask.max() > 200 and mask.min() < 10
    pub.stop()  # the counter is incremented right after the send: join the thread before reading it
    assert sample(pub, "events_published", "defect.cam1") == 1


def test_seq_per_topic_from_one_without_gaps(start_publisher):
    pub = start_publisher()
    with subscribed(pub.endpoint, "defect.", "status.") as sub:
        for i in range(1, 21):
            pub.publish_inspection(make_inspection("cam1", i), MODEL)
            if i <= 5:
                pub.publish_inspection(make_inspection("cam2", i), MODEL)
            if i <= 3:
                pub.publish_status("cam1", CameraState.UP)
        received = receive_data(sub, 28)
    seqs: dict[str, list[int]] = {}
    for topic, h, _ in received:
        seqs.setdefault(topic, []).append(h["seq"])
    assert seqs == {"defect.cam1": list(range(1, 21)), "defect.cam2": list(range(1, 6)), "status.cam1": [1, 2, 3]}
    assert [h["frame_seq"] for t, h, _ in received if t == "defect.cam1"] == list(range(1, 21))
    assert {h["run_id"] for _, h, _ in received} == {pub.run_id}
    pub.stop()
    assert sample(pub, "events_published", "defect.cam2") == 5


@pytest.mark.parametrize("results", [False, True])
def test_results_topic_on_and_off(start_publisher, results):
    pub = start_publisher()
    with subscribed(pub.endpoint, "defect.", "result.", "status.") as sub:
        pub.publish_inspection(make_inspection(seq=1, defect=False), MODEL, results=results)
        pub.publish_inspection(make_inspection(seq=2, defect=True), MODEL, results=results)
        pub.publish_status("cam1", CameraState.UP)  # a marker: nothing else may arrive before it
        expected = ["result.cam1", "defect.cam1", "result.cam1", "status.cam1"] if results else \
            ["defect.cam1", "status.cam1"]
        received = receive_data(sub, len(expected))
    assert [t for t, _, _ in received] == expected
    if results:
        ok = received[0][1]
        assert (ok["is_defect"], ok["frame_seq"], ok["seq"], ok["regions"]) == (False, 1, 1, [])
        assert received[2][1]["seq"] == 2 and received[2][1]["frame_seq"] == 2


def test_status_event(start_publisher):
    pub = start_publisher()
    with subscribed(pub.endpoint, "status.") as sub:
        pub.publish_status("line1-top", CameraState.DOWN, "no frame for 5.0 s")
        [(topic, h, attachments)] = receive_data(sub, 1)
    assert topic == "status.line1-top" and attachments == []
    assert (h["camera"], h["state"], h["detail"], h["seq"], h["attachments"]) == \
        ("line1-top", "down", "no frame for 5.0 s", 1, [])


def test_heartbeat_period_and_fields(start_publisher):
    pub = start_publisher(heartbeat_s=0.1, stats=lambda: {"fps": np.float32(7.5), "cameras": {"cam1": "up"},
                                                          "last_defect": "none"})
    with subscribed(pub.endpoint) as sub:
        beats = [receive(sub)[1] for _ in range(8)]
    times = [parse_rfc3339(h["published_at"]) for h in beats]
    period = (times[-1] - times[0]) / (len(times) - 1)
    assert 0.08 < period < 0.15, period
    assert [h["seq"] for h in beats] == list(range(beats[0]["seq"], beats[0]["seq"] + 8))
    h = beats[-1]
    assert (h["topic"], h["fps"], h["cameras"], h["model"], h["last_defect"]) == \
        ("heartbeat", 7.5, {"cam1": "up"}, MODEL, "none")
    assert isinstance(h["uptime_s"], float) and 0 < h["uptime_s"] < 10


def test_heartbeats_go_on_when_stats_fail(start_publisher):
    def broken() -> dict:
        raise RuntimeError("stats broke")

    pub = start_publisher(stats=broken)
    with subscribed(pub.endpoint) as sub:
        h = receive(sub)[1]
    assert (h["fps"], h["cameras"]) == (None, {})


def test_run_id_constant_within_a_publisher_and_unique_across(start_publisher):
    reloaded = {"name": "reloaded", "sha256": "cd" * 32}
    # After a reload the daemon's stats name the new model, and inspections carry the model that made them.
    a, b = start_publisher(stats=lambda: {"model": reloaded}), start_publisher()
    assert a.run_id != b.run_id
    with subscribed(a.endpoint, "status.", "defect.") as sub:
        a.publish_status("cam1", CameraState.UP)
        a.publish_inspection(make_inspection(), reloaded)
        received = receive_data(sub, 2)
        beat = receive(sub)[1]
    assert {h["run_id"] for _, h, _ in received} | {beat["run_id"]} == {a.run_id}
    assert received[1][1]["model"]["name"] == "reloaded" and beat["model"]["name"] == "reloaded"


def test_bind_to_an_endpoint_in_use_is_a_config_error(start_publisher):
    pub = start_publisher()
    assert pub.bound and re.match(r"^tcp://127\.0\.0\.1:\d+$", pub.endpoint) and not pub.endpoint.endswith(":0")
    other = Publisher(PublishConfig(endpoint=pub.endpoint), Metrics(CollectorRegistry()), "x", MODEL)
    with pytest.raises(ConfigError) as err:
        other.start()
    assert pub.endpoint in str(err.value) and "\n" not in str(err.value)
    assert not other.bound
    other.stop()  # harmless when never started


def test_caller_never_blocks_and_drops_are_counted(start_publisher):
    """A subscriber that never reads and a tiny send_hwm: publishing stays fast; queue drops are counted."""
    pub = start_publisher(send_hwm=4)
    insp = make_inspection()
    big = Inspection(insp.frame, insp.score, insp.threshold, True, insp.regions, b"\x89PNG" + bytes(100_000), (64, 48))
    n = 5000
    with subscribed(pub.endpoint, "defect.", rcvhwm=1):  # connected, then never read
        durations = []
        for _ in range(n):
            t0 = time.perf_counter()
            pub.publish_inspection(big, MODEL)
            durations.append(time.perf_counter() - t0)
        before_stop = pub.last_progress_mono
        pub.stop(timeout=1.0)
    durations.sort()
    assert durations[int(0.99 * n)] < 0.005 and durations[-1] < 0.1, (durations[int(0.99 * n)], durations[-1])
    published, dropped = sample(pub, "events_published", "defect.cam1"), sample(pub, "events_dropped", "defect.cam1")
    assert dropped > 0 and published > 0
    assert published + dropped == n
    assert pub.last_progress_mono >= before_stop


def test_stop_returns_promptly_with_unsent_messages(start_publisher):
    """The publisher thread is held up (a slow stats() call) while 1000 messages queue up: stop() still
    returns about `timeout` later, and what it could not send is counted as dropped."""
    slow = threading.Event()
    pub = start_publisher(send_hwm=1000, stats=lambda: (slow.is_set() and time.sleep(0.5)) or {})
    insp = make_inspection()
    with subscribed(pub.endpoint, "defect.", rcvhwm=1):
        slow.set()
        time.sleep(0.1)  # the next heartbeat is now stuck in stats()
        for _ in range(1000):
            pub.publish_inspection(insp, MODEL)
        t0 = time.monotonic()
        pub.stop(timeout=0.1)
        elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed
    assert not pub.bound
    published, dropped = sample(pub, "events_published", "defect.cam1"), sample(pub, "events_dropped", "defect.cam1")
    assert dropped > 0 and published + dropped == 1000
    pub.publish_status("cam1", CameraState.STOPPED)  # after stop: counted as dropped, never raises
    assert sample(pub, "events_dropped", "status.cam1") == 1
