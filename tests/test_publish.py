"""The publisher against real ZeroMQ SUB sockets on 127.0.0.1: the wire format, seq, heartbeats, never blocking."""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry
from support import TEST_MODEL, finishes_within, make_inspection, wait_until

from inspectd.config import PublishConfig
from inspectd.errors import ConfigError
from inspectd.frames import CameraState, Inspection
from inspectd.metrics import Metrics
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

MODEL = TEST_MODEL
RFC3339_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def sample(pub: Publisher, name: str, topic: str) -> float:
    return pub.metrics.registry.get_sample_value(f"inspectd_{name}_total", {"topic": topic}) or 0.0


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
    assert header == {
        "schema": SCHEMA,
        "run_id": "r1",
        "topic": "status.cam1",
        "seq": 7,
        "published_at": "1970-01-01T00:00:01.000000Z",
        "camera": "cam1",
        "state": "down",
        "detail": "timeout",
        "attachments": [],
    }
    good_header = parts[1]
    for bad in (
        [b"defect.cam1"],
        [b"defect.cam1", b"{not json"],
        [b"defect.cam1", b"[1]"],
        [b"defect.cam1", good_header.replace(b"inspectd.event/1", b"inspectd.event/2")],
        [b"defect.cam1", good_header, b"an attachment the header does not name"],
    ):
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
    assert set(h) == {
        "schema",
        "run_id",
        "topic",
        "seq",
        "published_at",
        "camera",
        "frame_seq",
        "captured_at",
        "score",
        "threshold",
        "mask_threshold",
        "is_defect",
        "model",
        "regions",
        "frame",
        "episode",
        "attachments",
    }
    assert (h["schema"], h["run_id"], h["topic"], h["seq"]) == (SCHEMA, pub.run_id, "defect.cam1", 1)
    assert (h["camera"], h["frame_seq"], h["is_defect"], h["model"]) == ("cam1", 1, True, MODEL)
    assert isinstance(h["score"], float) and h["score"] == pytest.approx(0.9)
    assert isinstance(h["threshold"], float) and h["threshold"] == 0.5
    assert isinstance(h["mask_threshold"], float) and h["mask_threshold"] == insp.mask_threshold == 0.5  # probability:0.5
    assert RFC3339_US.match(h["captured_at"]) and RFC3339_US.match(h["published_at"])
    assert h["captured_at"] == rfc3339(insp.frame.captured_at)
    assert 0 <= parse_rfc3339(h["published_at"]) - parse_rfc3339(h["captured_at"]) < 5
    assert h["frame"] == {"width": 64, "height": 48}
    assert h["regions"] == [r.as_dict() for r in insp.regions]
    region = h["regions"][0]
    assert all(isinstance(v, int) for v in region["bbox"]) and isinstance(region["area_px"], int)
    # regions last: added within the schema, so positional consumers of "mask, frame" keep working
    assert h["attachments"] == [
        {"kind": "mask", "encoding": "png", "width": 64, "height": 48},
        {"kind": "frame", "encoding": "jpeg", "width": 64, "height": 48},
        {"kind": "regions", "encoding": "png", "width": 64, "height": 48},
    ]
    assert attachments == [insp.mask_png, insp.frame_jpeg, insp.regions_png]
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
        expected = ["result.cam1", "defect.cam1", "result.cam1", "status.cam1"] if results else ["defect.cam1", "status.cam1"]
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
    assert (h["camera"], h["state"], h["detail"], h["seq"], h["attachments"]) == (
        "line1-top",
        "down",
        "no frame for 5.0 s",
        1,
        [],
    )


def test_heartbeat_period_and_fields(start_publisher):
    pub = start_publisher(
        heartbeat_s=0.1, stats=lambda: {"fps": np.float32(7.5), "cameras": {"cam1": "up"}, "last_defect": "none"}
    )
    with subscribed(pub.endpoint) as sub:
        beats = [receive(sub)[1] for _ in range(8)]
    # The publisher's own timestamps: the period it keeps, whatever the test thread's scheduling.
    times = [parse_rfc3339(h["published_at"]) for h in beats]
    period = (times[-1] - times[0]) / (len(times) - 1)
    # At least the configured 0.1 s (it waits: no flood), and not the 1 s default (the setting is used);
    # no tighter upper bound: a loaded machine may run the thread late.
    assert period >= 0.095 and period < 0.5, period
    assert [h["seq"] for h in beats] == list(range(beats[0]["seq"], beats[0]["seq"] + 8))
    h = beats[-1]
    assert (h["topic"], h["fps"], h["cameras"], h["model"], h["last_defect"]) == ("heartbeat", 7.5, {"cam1": "up"}, MODEL, "none")
    assert isinstance(h["uptime_s"], float) and h["uptime_s"] >= times[-1] - times[0]


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


class HeldUp:
    """A stats() callable that, once armed, holds the publisher thread inside the next heartbeat."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self.armed, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()

    def __call__(self) -> dict:
        if self.armed.is_set():
            self.entered.set()
            self.release.wait(self.hold_s)
        return {}

    def hold(self) -> None:
        """Arm, and return once the publisher thread is held."""
        self.armed.set()
        wait_until(self.entered.is_set, 5, "the publisher thread to enter stats() (its next heartbeat)")


def test_caller_never_blocks_and_drops_are_counted(start_publisher):
    """The publisher thread is held up, so nothing leaves the hand-off queue (send_hwm 4): publish_* calls
    still return, and every message beyond the 4 queued is counted as dropped, at once."""
    held = HeldUp(hold_s=30)
    pub = start_publisher(send_hwm=4, stats=held)
    insp = make_inspection()
    n = 50
    with subscribed(pub.endpoint, "defect.", "status."):
        held.hold()

        def publish_all():
            for _ in range(n):
                pub.publish_inspection(insp, MODEL)
            pub.publish_status("cam1", CameraState.UP)

        finishes_within(publish_all, 10, f"{n + 1} publish_* calls while the publisher thread is held up")
        assert sample(pub, "events_dropped", "defect.cam1") == n - 4  # the queue holds 4; counted when dropped
        assert sample(pub, "events_dropped", "status.cam1") == 1
        assert sample(pub, "events_published", "defect.cam1") == 0
        held.release.set()
        pub.stop(timeout=1.0)
    assert sample(pub, "events_published", "defect.cam1") == 4


def test_a_stuck_subscriber_does_not_hold_up_the_publisher(start_publisher):
    """A subscriber that never reads (and a tiny send_hwm): the callers and the publisher thread go on;
    every message is accounted for as published or dropped."""
    pub = start_publisher(send_hwm=4)
    insp = make_inspection()
    big = Inspection(insp.frame, insp.score, insp.threshold, True, insp.regions, b"\x89PNG" + bytes(100_000), (64, 48))
    n = 1000
    with subscribed(pub.endpoint, "defect.", rcvhwm=1):  # connected, then never read

        def publish_all():
            for _ in range(n):
                pub.publish_inspection(big, MODEL)

        finishes_within(publish_all, 60, f"{n} publish_inspection calls with a stuck subscriber")
        burst_end = time.monotonic()
        # The publisher thread is not stuck behind the subscriber: it empties its queue and keeps looping.
        wait_until(
            lambda: sample(pub, "events_published", "defect.cam1") + sample(pub, "events_dropped", "defect.cam1") == n,
            30,
            f"all {n} messages published or dropped",
        )
        wait_until(lambda: pub.last_progress_mono > burst_end, 5, "the publisher thread to make progress after the burst")
        pub.stop(timeout=1.0)
    published, dropped = sample(pub, "events_published", "defect.cam1"), sample(pub, "events_dropped", "defect.cam1")
    assert published > 0 and published + dropped == n


def test_stop_returns_promptly_with_unsent_messages(start_publisher, caplog):
    """The publisher thread is held up (in stats()) while 1000 messages queue up, and until after stop()'s
    deadline: stop() still ends the thread, and what it could not send by the deadline is counted as dropped."""
    held = HeldUp(hold_s=30)
    pub = start_publisher(send_hwm=1000, stats=held)
    insp = make_inspection()

    def release_after_the_deadline():
        wait_until(lambda: not pub.bound, 10, "stop() to be called")
        time.sleep(0.3)  # stop(timeout=0.1) set its deadline as it began: it has passed now
        held.release.set()

    with caplog.at_level(logging.INFO, logger="inspectd.outputs.publish"), subscribed(pub.endpoint, "defect.", rcvhwm=1):
        held.hold()
        for _ in range(1000):
            pub.publish_inspection(insp, MODEL)
        releaser = threading.Thread(target=release_after_the_deadline, daemon=True)
        releaser.start()
        pub.stop(timeout=0.1)
        releaser.join()
    assert not pub.bound
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("publisher on ") and m.endswith(" closed") for m in messages), messages
    assert not any("did not stop" in m for m in messages), messages  # stop() returned because the thread ended
    published, dropped = sample(pub, "events_published", "defect.cam1"), sample(pub, "events_dropped", "defect.cam1")
    # At most the one message the loop had already taken when it left stats() goes out; the rest is dropped.
    assert published <= 1 and published + dropped == 1000, (published, dropped)
    pub.publish_status("cam1", CameraState.STOPPED)  # after stop: counted as dropped, never raises
    assert sample(pub, "events_dropped", "status.cam1") == 1


def test_the_live_views_ring_gets_every_defect_event_as_sent_or_dropped():
    """[ui] with the archive off: each defect event goes to the recent-defects ring with its frame, the header as
    published (seq 1, 2...) or, when the hand-off queue was full, unnumbered (seq null); ok frames never."""
    from inspectd.outputs.recent import MemoryDefects

    ring = MemoryDefects()
    held = HeldUp(hold_s=30)
    pub = Publisher(
        PublishConfig(endpoint="tcp://127.0.0.1:0", heartbeat_s=0.05, send_hwm=2),
        Metrics(CollectorRegistry()),
        "run1",
        MODEL,
        held,
        outcome=ring.on_outcome,
    )
    pub.start()
    try:
        insp, ok = make_inspection(), make_inspection(defect=False)
        held.hold()
        for _ in range(3):  # two queued, the third dropped at once
            pub.publish_inspection(insp, MODEL)
        pub.publish_inspection(ok, MODEL)
        assert [r.header["seq"] for r in ring.recent()] == [None]
        held.release.set()
        wait_until(lambda: len(ring.recent()) == 3, 5, "the two queued events sent")
    finally:
        pub.stop(timeout=1.0)
    records = ring.recent()
    assert [r.header["seq"] for r in records] == [2, 1, None]
    assert all(r.image is insp.frame.image and r.header["topic"] == "defect.cam1" for r in records)
    assert records[0].files["mask.png"] == insp.mask_png


def test_probabilities_are_published_to_six_decimals():
    """A mask rule that puts the threshold at logit 27 gave `mask_threshold: 0.9999999999988829` on the wire."""
    import dataclasses

    from inspectd.outputs.wire import inspection_body

    insp = dataclasses.replace(make_inspection(), score=0.123456789, mask_threshold=0.9999999999988829, threshold=0.5)
    body, _ = inspection_body(insp, MODEL, with_frame=False)
    assert (body["score"], body["mask_threshold"], body["threshold"]) == (0.123457, 1.0, 0.5)
    assert all(len(repr(r[k]).split(".")[-1]) <= 6 for r in body["regions"] for k in ("peak", "mean"))
