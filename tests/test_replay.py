"""Replay (`inspectd.replay/1`): a real publisher, its ring, a real ROUTER endpoint and archive, real
DEALER and SUB sockets on 127.0.0.1. The daemon end to end (a consumer restarted mid-burst) is in
test_daemon_replay.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import zmq
from prometheus_client import CollectorRegistry
from support import TEST_MODEL, LateRelay, free_port, make_inspection, wait_until

from inspectd.client import ReplayClient, ReplayError, Subscriber
from inspectd.config import PublishConfig, ReplayConfig
from inspectd.metrics import Metrics
from inspectd.outputs.archive import Archive, message_entry, write_entry
from inspectd.outputs.fanout import Fanout
from inspectd.outputs.publish import Publisher
from inspectd.outputs.replay import ReplayServer, Ring, parse_request
from inspectd.outputs.wire import END_TOPIC, REQUEST_TAG, encode_message, inspection_body


class Line:
    """A publisher with a ring, its replay endpoint, and optionally an archive; all stopped at the end."""

    def __init__(
        self,
        tmp_path: Path,
        ring_messages: int = 1000,
        max_messages: int = 1000,
        archive: bool = False,
        publish: str = "tcp://127.0.0.1:0",
        replay: str = "tcp://127.0.0.1:0",
    ):
        self.metrics = Metrics(CollectorRegistry())
        self.run_id = uuid.uuid4().hex
        self.archive = Archive(tmp_path / "archive").start() if archive else None  # indexes what earlier runs left
        self.ring = Ring(ring_messages, 10**9)
        self.pub = Publisher(
            PublishConfig(endpoint=publish, heartbeat_s=0.05),
            self.metrics,
            self.run_id,
            TEST_MODEL,
            outcome=Fanout({"replay ring": self.ring.on_outcome, **({"archive": self.archive.on_outcome} if archive else {})}),
        )
        self.pub.start()
        cfg = ReplayConfig(endpoint=replay, max_messages=max_messages)
        self.replay = ReplayServer(cfg, self.run_id, self.ring, self.archive, self.metrics, self.pub.last_seq).start()
        self.ctx = zmq.Context()

    def defects(self, n: int, camera: str = "cam1") -> None:
        start = self.pub.last_seq(f"defect.{camera}")
        for i in range(n):
            self.pub.publish_inspection(make_inspection(camera, start + i + 1, archive_frame="jpeg"), TEST_MODEL)
        wait_until(lambda: self.pub.last_seq(f"defect.{camera}") == start + n, 10, f"{n} defects published")

    def client(self) -> ReplayClient:
        return ReplayClient(self.ctx, self.replay.endpoint, timeout_s=5)

    def requests(self, status: str) -> float:
        return self.metrics.registry.get_sample_value("inspectd_replay_requests_total", {"status": status})

    def close(self) -> None:
        self.replay.stop()
        self.pub.stop(0.5)
        if self.archive is not None:
            self.archive.stop()
        self.ctx.term()


@pytest.fixture()
def line(tmp_path):
    made: list[Line] = []

    def make(**kw) -> Line:
        made.append(Line(tmp_path, **kw))
        return made[-1]

    yield make
    for one in made:
        one.close()


def _seqs(messages) -> list[int]:
    return [json.loads(parts[1])["seq"] for parts in messages]


def test_an_answer_is_what_was_published_in_order_then_an_end(line):
    ln = line()
    with Subscriber(ln.pub.endpoint, ["defect.", "heartbeat"]) as sub:
        assert sub.recv(5).topic == "heartbeat"  # connected: what is published now reaches us
        ln.defects(1)
        live = next(e for e in iter(lambda: sub.recv(5), None) if e.topic == "defect.cam1")
    ln.defects(4)
    client = ln.client()
    messages, end = client.fetch(ln.run_id, "defect.cam1", 0)
    assert _seqs(messages) == [1, 2, 3, 4, 5]
    assert messages[0][1:] == [
        json.dumps(live.header, separators=(",", ":"), ensure_ascii=False).encode(),
        live.raw["mask"],
        live.raw["regions"],
    ]  # byte for byte
    assert end["status"] == "complete" and end["last_seq"] == 5 and end["missing"] == []
    messages, end = client.fetch(ln.run_id, "defect.cam1", 3)
    assert _seqs(messages) == [4, 5] and end["status"] == "complete"
    messages, end = client.fetch(ln.run_id, "defect.cam1", 5)
    assert messages == [] and end["status"] == "complete"
    assert ln.requests("complete") == 3
    client.close()


def test_answers_are_bounded_and_say_partial(line):
    ln = line(max_messages=3)
    ln.defects(7)
    client = ln.client()
    messages, end = client.fetch(ln.run_id, "defect.cam1", 0)
    assert _seqs(messages) == [1, 2, 3] and end["status"] == "partial" and end["last_seq"] == 3
    messages, end = client.fetch(ln.run_id, "defect.cam1", end["last_seq"])
    assert _seqs(messages) == [4, 5, 6] and end["status"] == "partial"
    messages, end = client.fetch(ln.run_id, "defect.cam1", end["last_seq"])
    assert _seqs(messages) == [7] and end["status"] == "complete"
    client.close()


def test_what_left_the_ring_comes_from_the_archive_or_is_reported_gone(line):
    without = line(ring_messages=3)
    without.defects(6)
    client = without.client()
    messages, end = client.fetch(without.run_id, "defect.cam1", 0)
    assert _seqs(messages) == [4, 5, 6] and end["missing"] == [[1, 3]] and end["status"] == "complete"
    client.close()

    archived = line(ring_messages=3, archive=True)
    archived.defects(6)
    wait_until(lambda: archived.archive.written == 6, 10, "6 entries archived")
    client = archived.client()
    messages, end = client.fetch(archived.run_id, "defect.cam1", 0)
    assert _seqs(messages) == [1, 2, 3, 4, 5, 6] and end["missing"] == []
    assert messages[0][0] == b"defect.cam1" and len(messages[0]) == 4  # topic, header, mask, regions
    client.close()


def test_another_run_is_answered_from_the_archive_or_said_unknown(line, tmp_path):
    # A previous run's entries, as the archive holds them after a restart.
    root = tmp_path / "old"
    for seq in (1, 2, 4):
        insp = make_inspection("cam1", seq, archive_frame="jpeg")
        body, parts = inspection_body(insp, TEST_MODEL, with_frame=True)
        wire = encode_message("defect.cam1", "oldrun", seq, body, parts)
        write_entry(root, message_entry(wire[1], wire[2:], (("frame.jpg", insp.archive_frame),)))
    ln = line()
    old = Archive(root).start()  # what the restarted daemon indexes at start
    ln.replay.archive = old
    client = ln.client()
    messages, end = client.fetch("oldrun", "defect.cam1", 1)
    assert _seqs(messages) == [2, 4] and end["missing"] == [[3, 3]] and end["last_seq"] == 4
    assert end["status"] == "complete" and end["current_run_id"] == ln.run_id
    messages, end = client.fetch("nosuchrun", "defect.cam1", 0)
    assert messages == [] and end["status"] == "unknown_run" and end["current_run_id"] == ln.run_id
    client.close()
    old.stop()


@pytest.mark.parametrize(
    "parts,reason",
    [
        ([b"hello"], "a request is 2 parts"),
        ([b"other/1", b"{}"], "a request is 2 parts"),
        ([REQUEST_TAG, b"\xff\xfe"], "not UTF-8 JSON"),
        ([REQUEST_TAG, b"[1, 2]"], "not a JSON object"),
        ([REQUEST_TAG, b'{"run_id": "r", "topic": "defect.a", "after_seq": -1}'], "after_seq"),
        ([REQUEST_TAG, b'{"run_id": "r", "topic": "defect.a", "after_seq": true}'], "after_seq"),
        ([REQUEST_TAG, b'{"run_id": "", "topic": "defect.a", "after_seq": 0}'], "run_id"),
        ([REQUEST_TAG, b'{"run_id": "r", "topic": "heartbeat", "after_seq": 0}'], "topic"),
        ([REQUEST_TAG, b'{"run_id": "r", "topic": "d\\u00e9", "after_seq": 0}'], "topic"),
        ([REQUEST_TAG, b"x" * 5000], "larger than 1024 bytes"),
    ],
)
def test_malformed_requests_get_an_error_and_are_counted(line, parts, reason):
    ln = line()
    sock = ln.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ln.replay.endpoint)
    sock.send_multipart(parts)
    assert sock.poll(5000), "no answer"
    topic, end = sock.recv_multipart()
    end = json.loads(end)
    assert topic == END_TOPIC.encode() and end["status"] == "error" and reason in end["reason"], end
    assert ln.requests("error") == 1
    sock.close()
    # ...and the endpoint still serves well-formed requests.
    ln.defects(1)
    messages, end = ln.client().fetch(ln.run_id, "defect.cam1", 0)
    assert _seqs(messages) == [1] and end["status"] == "complete"


def test_a_huge_message_is_never_read(line):
    """Over 64 KiB ZeroMQ disconnects the sender (MAXMSGSIZE): no answer, and the endpoint lives on."""
    ln = line()
    sock = ln.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ln.replay.endpoint)
    sock.send_multipart([REQUEST_TAG, b"x" * 200_000])
    assert not sock.poll(500)
    sock.close()
    ln.defects(1)
    assert _seqs(ln.client().fetch(ln.run_id, "defect.cam1", 0)[0]) == [1]


def test_parse_request_accepts_the_documented_form():
    assert parse_request(b'{"run_id": "ab", "topic": "defect.x", "after_seq": 7, "extra": 1}') == ("ab", "defect.x", 7)


def test_a_silent_endpoint_raises_and_the_socket_is_made_anew(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # receives, never answers
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = ReplayClient(ctx, f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    with pytest.raises(ReplayError, match="no answer"):
        client.fetch("r", "defect.a", 0)
    assert client._sock is None
    router.close(0)
    ctx.term()


# ------------------------------------------------------------------------------------------ the client fills gaps
def test_a_resumed_consumer_gets_what_it_missed_exactly_once(line):
    """Defects 1-4 published while the consumer was away; it resumes from position 2."""
    ln = line()
    ln.defects(4)
    with Subscriber(ln.pub.endpoint, ["defect."], replay=ln.replay.endpoint, positions={ln.run_id: {"defect.cam1": 2}}) as sub:
        got = [sub.recv(5) for _ in range(2)]  # the next heartbeat says last_seq 4: 3 and 4 are fetched
        assert [e.header["seq"] for e in got] == [3, 4] and all(e.replayed and e.gap == 0 for e in got)
        ln.defects(2)
        live = [sub.recv(5) for _ in range(2)]
        assert [e.header["seq"] for e in live] == [5, 6] and not any(e.replayed for e in live)
        assert sub.recv(0.3) is None  # nothing twice
        assert sub.positions[ln.run_id]["defect.cam1"] == 6 and sub.replayed == 2 and sub.gaps == {}


def test_a_run_that_began_after_the_consumer_loses_nothing_sent_before_its_subscription_took_hold(line):
    """The consumer runs first; the daemon starts and publishes 3 defects before the consumer's connection is
    let through (LateRelay): what a slow joiner misses of a run that began while it ran comes through replay,
    from seq 1, exactly once and in order. (It used to take the run's first heartbeat as its baseline and
    lose 1-3, every time.)"""
    publish, replay = free_port(), free_port()
    with (
        LateRelay(publish) as relay,
        Subscriber(f"tcp://127.0.0.1:{relay.port}", ["defect."], replay=f"tcp://127.0.0.1:{replay}") as sub,
    ):
        ln = line(publish=f"tcp://127.0.0.1:{publish}", replay=f"tcp://127.0.0.1:{replay}")
        ln.defects(3)  # no subscriber connected: ZeroMQ drops them for us
        relay.open()
        got = [sub.recv(5) for _ in range(3)]
        assert [(e.header["seq"], e.replayed) for e in got if e] == [(1, True), (2, True), (3, True)]
        ln.defects(1)
        live = sub.recv(5)
        assert live is not None and live.header["seq"] == 4 and not live.replayed
        assert sub.recv(0.3) is None and sub.gaps == {} and sub.positions[ln.run_id] == {"defect.cam1": 4}


def test_a_new_consumer_starts_from_now_and_what_is_gone_is_a_gap(line):
    ln = line(ring_messages=2)
    ln.defects(3)
    with Subscriber(ln.pub.endpoint, ["defect."], replay=ln.replay.endpoint) as sub:
        wait_until(lambda: sub.recv(0.05) is None and ln.run_id in sub.positions, 5, "the baseline from a heartbeat")
        assert sub.positions[ln.run_id] == {"defect.cam1": 3}  # no history for a new consumer
    # A consumer that was at 1: 2 and 3 are in the ring (2 messages), 4..6 come; nothing is lost.
    # One at 0 with a ring of 2 after 6: 1..4 are gone for good and reported as its gap.
    ln.defects(3)
    with Subscriber(ln.pub.endpoint, ["defect."], replay=ln.replay.endpoint, positions={ln.run_id: {"defect.cam1": 0}}) as sub:
        got = [sub.recv(5) for _ in range(2)]
        assert [e.header["seq"] for e in got] == [5, 6] and got[0].gap == 4 and sub.gaps == {"defect.cam1": 4}


def test_after_a_daemon_restart_the_rest_of_the_earlier_run_comes_from_the_archive(line):
    before = line(archive=True)
    before.defects(3)
    wait_until(lambda: before.archive.written == 3, 10, "3 entries archived")
    old_run = before.run_id
    before.close()  # the daemon stops; the consumer had handed out seq 1 only
    after = line(archive=True)  # restarted on the same archive: a new run
    after.defects(1)
    with Subscriber(
        after.pub.endpoint, ["defect."], replay=after.replay.endpoint, positions={old_run: {"defect.cam1": 1}}
    ) as sub:
        got = [sub.recv(5) for _ in range(2)]
        assert [(e.header["run_id"], e.header["seq"], e.replayed) for e in got] == [(old_run, 2, True), (old_run, 3, True)]
        after.defects(1)
        # The new run began after the saved positions: followed from seq 1 (through replay), then live.
        rest = [sub.recv(5) for _ in range(2)]
        assert [(e.header["run_id"], e.header["seq"], e.replayed) for e in rest] == [
            (after.run_id, 1, True),
            (after.run_id, 2, False),
        ]
        assert sub.positions[old_run] == {"defect.cam1": 3}


def test_a_seq_still_waiting_for_the_disk_is_waited_for_not_called_gone(line, monkeypatch):
    """The ring (3) has moved on while the archive writer is stuck: the answer waits for the writer."""
    import threading

    import inspectd.outputs.archive as archive_module

    gate = threading.Event()
    real = archive_module.write_entry
    monkeypatch.setattr(archive_module, "write_entry", lambda root, entry: gate.wait(10) and real(root, entry))
    ln = line(ring_messages=3, archive=True)
    ln.defects(6)
    answers = []
    asker = threading.Thread(target=lambda: answers.append(ln.client().fetch(ln.run_id, "defect.cam1", 0)))
    asker.start()
    # the replay thread is inside wait_written (a waiter on the archive's condition), nothing written yet
    wait_until(lambda: len(ln.archive._written._waiters) > 0, 5, "the answer waiting for the writer")
    assert ln.archive.written == 0
    gate.set()
    asker.join(10)
    messages, end = answers[0]
    assert _seqs(messages) == [1, 2, 3, 4, 5, 6] and end["missing"] == [] and end["status"] == "complete"


def test_a_request_costs_the_same_whatever_the_range(line):
    """after_seq 0 against a topic at seq 10^12 with nothing kept: one range, answered at once (the work
    is bounded by what is kept, never by the numbers in the request)."""
    ln = line()
    ln.replay._last_seq = lambda topic: 10**12
    messages, end = ln.client().fetch(ln.run_id, "defect.cam1", 0)
    assert messages == [] and end["missing"] == [[1, 10**12]] and end["last_seq"] == 10**12


def test_a_topic_new_since_the_consumer_left_comes_from_its_first_seq(line):
    """Positions know cam1 only; cam2's first defects came while the consumer was away."""
    ln = line()
    ln.defects(2, camera="cam1")
    ln.defects(3, camera="cam2")
    with Subscriber(ln.pub.endpoint, ["defect."], replay=ln.replay.endpoint, positions={ln.run_id: {"defect.cam1": 2}}) as sub:
        got = [sub.recv(5) for _ in range(3)]
        assert [(e.topic, e.header["seq"]) for e in got] == [("defect.cam2", 1), ("defect.cam2", 2), ("defect.cam2", 3)]
        assert sub.gaps == {}
    # A consumer that stays: once its baseline is set, a new topic's first messages are fetched too.
    with Subscriber(ln.pub.endpoint, ["defect."], replay=ln.replay.endpoint) as sub:
        wait_until(lambda: sub.recv(0.05) is None and ln.run_id in sub.filler.settled, 5, "the baseline")
        ln.defects(2, camera="cam3")
        got = [sub.recv(5) for _ in range(2)]
        assert [(e.topic, e.header["seq"]) for e in got] == [("defect.cam3", 1), ("defect.cam3", 2)]
