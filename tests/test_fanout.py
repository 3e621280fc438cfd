"""The publisher's outputs as listeners (inspectd.outputs.fanout): a real Publisher on a real ZeroMQ socket tells
every listener what became of each message; a listener that fails costs the others nothing."""

from __future__ import annotations

import json
import logging
import threading
import uuid

from prometheus_client import CollectorRegistry
from support import make_inspection, wait_until

from inspectd.config import PublishConfig
from inspectd.metrics import Metrics
from inspectd.outputs.fanout import Fanout, Fate, Outcome
from inspectd.outputs.publish import Publisher
from inspectd.outputs.wire import decode_message

MODEL = {"name": "m", "sha256": "0" * 64}


class Heard:
    """A listener that keeps what it hears (thread-safe: the publisher's thread and the callers' call it)."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def __call__(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def of(self, fate: Fate, prefix: str = "") -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.fate is fate and o.topic.startswith(prefix)]


def _broken(outcome: Outcome) -> None:
    raise OSError("disk on fire")


def test_every_listener_hears_sent_dropped_and_kept_even_beside_a_broken_one(caplog):
    heard = Heard()
    outputs = Fanout({"broken": _broken})
    outputs.listen("heard", heard)
    assert outputs.names == ["broken", "heard"]
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    pub = Publisher(
        PublishConfig(endpoint="tcp://127.0.0.1:0", send_hwm=1, heartbeat_s=60), metrics, uuid.uuid4().hex, MODEL, outcome=outputs
    )
    with caplog.at_level(logging.ERROR, logger="inspectd.outputs.fanout"):
        pub.publish_inspection(make_inspection("cam", 1, archive_frame="png"), MODEL)  # queued: not started yet
        pub.publish_inspection(make_inspection("cam", 2, archive_frame="png"), MODEL)  # the queue holds 1: dropped
        pub.start()
        try:
            pub.publish_inspection(make_inspection("cam", 8, defect=False, archive_frame="png", ok_every=4), MODEL)
            wait_until(
                lambda: len(heard.of(Fate.SENT, "defect.")) == 1 and heard.of(Fate.KEPT),
                10,
                lambda: f"the defect sent and the ok frame kept, heard {[(o.fate, o.topic) for o in heard.outcomes]}",
            )
            pub.publish_inspection(make_inspection("cam", 3, archive_frame="png"), MODEL)
            wait_until(lambda: len(heard.of(Fate.SENT, "defect.")) == 2, 10, "the publisher still sending")
        finally:
            pub.stop(1.0)

    sent = heard.of(Fate.SENT, "defect.")
    assert [o.seq for o in sent] == [1, 2] and pub.last_seq("defect.cam") == 2
    topic, header, attachments = decode_message(list(sent[0].parts))
    assert topic == "defect.cam" and header["seq"] == 1 and header["frame_seq"] == 1 and len(attachments) >= 1
    assert sent[0].kept_frame is not None and sent[0].kept_frame[0] == "png" and sent[0].image is not None
    [dropped] = heard.of(Fate.DROPPED, "defect.")
    header = json.loads(dropped.header)  # unnumbered: not a message decode_message accepts
    assert dropped.seq is None and header["seq"] is None and header["frame_seq"] == 2
    [kept] = heard.of(Fate.KEPT)
    assert kept.topic == "result.cam" and json.loads(kept.header)["frame_seq"] == 8
    assert registry.get_sample_value("inspectd_events_dropped_total", {"topic": "defect.cam"}) == 1
    # The broken output was logged once for its whole failure streak, not once per message.
    failures = [r for r in caplog.records if "output broken failed" in r.getMessage()]
    assert len(failures) == 1 and len(heard.outcomes) >= 4


def test_a_listener_that_recovers_is_logged_again_on_its_next_failure(caplog):
    calls = {"n": 0}

    def flaky(outcome: Outcome) -> None:
        calls["n"] += 1
        if calls["n"] in (1, 2, 4):
            raise ValueError("flaky")

    outputs = Fanout({"flaky": flaky})
    outcome = Outcome(Fate.KEPT, (b"result.cam", b"{}"))
    with caplog.at_level(logging.INFO, logger="inspectd.outputs.fanout"):
        for _ in range(4):
            outputs(outcome)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "output flaky failed on a message; the other outputs go on",
        "output flaky works again",
        "output flaky failed on a message; the other outputs go on",
    ]
