"""The consumer's exactly-once rules (`inspectd.client.GapFiller`) on their own, without sockets: the replay
endpoint is stood in for by a function over the messages a publisher numbered (the same encode_message the
daemon uses). The whole path, with a real daemon-side ReplayServer and real sockets, is in test_replay.py."""

from __future__ import annotations

import uuid

import pytest

from inspectd.client import Event, GapFiller, ReplayError, decode_event
from inspectd.outputs.wire import encode_message, status_body

RUN = uuid.uuid4().hex
TOPIC = "status.cam1"


def _message(seq: int, topic: str = TOPIC, run: str = RUN) -> list[bytes]:
    return encode_message(topic, run, seq, status_body("cam1", "up", f"message {seq}"))


def _heartbeat(last_seq: dict[str, int], run: str = RUN, uptime_s: float = 1.0) -> list[bytes]:
    body = {"fps": 1.0, "cameras": {}, "uptime_s": uptime_s, "model": {}, "last_seq": last_seq}
    return encode_message("heartbeat", run, 1, body)


class Clock:
    """The consumer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Daemon:
    """The messages of one run, answering replay requests as inspectd.replay/1 does: at most `limit` per
    answer (`partial` with the last seq sent), or an error that raises ReplayError."""

    def __init__(self, sent: int, limit: int = 100, down: bool = False):
        self.messages = {seq: _message(seq) for seq in range(1, sent + 1)}
        self.limit, self.down, self.asked = limit, down, []

    def fetch(self, run: str, topic: str, after: int) -> tuple[list[list[bytes]], dict]:
        self.asked.append((run, topic, after))
        if self.down:
            raise ReplayError("no answer within 5 s")
        seqs = [s for s in sorted(self.messages) if s > after][: self.limit]
        partial = len(seqs) == self.limit and seqs[-1] < max(self.messages)
        last = seqs[-1] if seqs else max(self.messages, default=after)
        return [self.messages[s] for s in seqs], {"status": "partial" if partial else "complete", "last_seq": last}


def _decode(parts: list[bytes]) -> Event:
    import dataclasses

    return dataclasses.replace(decode_event(parts), replayed=True)


def _deliver(filler: GapFiller, daemon: Daemon, parts: list[bytes]) -> list[Event]:
    """What the consumer hands out for one message received."""
    return [filler.handed_out(e) for e in filler.received("tcp://d:5556", decode_event(parts), daemon.fetch, _decode)]


def _seqs(events: list[Event]) -> list[tuple[int, bool, int]]:
    return [(e.header["seq"], e.replayed, e.gap) for e in events]


@pytest.mark.parametrize("limit", [100, 2])
def test_a_gap_is_filled_in_order_before_the_message_after_it(limit):
    daemon = Daemon(sent=6, limit=limit)
    filler = GapFiller(["status."])
    assert _deliver(filler, daemon, _heartbeat({TOPIC: 1})) == []  # the baseline: seq 1 is the past
    got = _deliver(filler, daemon, daemon.messages[2]) + _deliver(filler, daemon, daemon.messages[6])
    # The answer runs to the newest seq the daemon holds: 6 comes through replay, and its live copy is not
    # handed out a second time.
    assert _seqs(got) == [(2, False, 0), (3, True, 0), (4, True, 0), (5, True, 0), (6, True, 0)]
    assert filler.positions == {RUN: {TOPIC: 6}} and filler.replayed == 4 and filler.gaps == {}
    assert len(daemon.asked) == (1 if limit == 100 else 2)  # a partial answer is followed from its last seq


def test_a_message_fetched_already_is_not_handed_out_again():
    daemon = Daemon(sent=5)
    filler = GapFiller(["status."], positions={RUN: {TOPIC: 1}})  # resumed: counts from seq 2
    got = _deliver(filler, daemon, daemon.messages[4])  # 2 and 3 fetched first
    got += _deliver(filler, daemon, daemon.messages[3])  # arrives live late: a duplicate
    got += _deliver(filler, daemon, daemon.messages[5])
    assert [e.header["seq"] for e in got] == [2, 3, 4, 5]


def test_an_unanswered_fill_counts_the_loss_and_goes_on():
    daemon = Daemon(sent=5, down=True)
    filler = GapFiller(["status."], positions={RUN: {TOPIC: 1}})
    got = _deliver(filler, daemon, daemon.messages[5])
    assert _seqs(got) == [(5, False, 3)] and filler.gaps == {TOPIC: 3} and filler.replay_failures == 1


def test_a_heartbeat_reveals_losses_during_a_silence():
    daemon = Daemon(sent=3)
    filler = GapFiller(["status."], positions={RUN: {TOPIC: 1}})
    got = _deliver(filler, daemon, _heartbeat({TOPIC: 3}))  # nothing arrived, but the daemon sent up to 3
    assert _seqs(got) == [(2, True, 0), (3, True, 0)]


def test_an_earlier_run_is_finished_from_the_archive_once_the_daemon_restarted():
    old = Daemon(sent=4)  # the run before the restart: this consumer had handed out up to 2
    filler = GapFiller(["status."], positions={RUN: {TOPIC: 2}})
    new_run = uuid.uuid4().hex
    first = encode_message(TOPIC, new_run, 1, status_body("cam1", "up"))
    got = [filler.handed_out(e) for e in filler.received("tcp://d:5556", decode_event(first), old.fetch, _decode)]
    assert [(e.header["run_id"], e.header["seq"]) for e in got] == [(RUN, 3), (RUN, 4), (new_run, 1)]
    assert old.asked == [(RUN, TOPIC, 2)]


def test_a_run_that_began_while_the_consumer_ran_is_followed_from_seq_1():
    """The daemon started 5 s after the consumer, and its first 3 events went out before the subscription
    took hold (a slow joiner): they come through replay, in order, before the first one received."""
    clock, daemon = Clock(), Daemon(sent=4)
    filler = GapFiller(["status."], clock=clock)
    clock.now += 10.0
    assert _deliver(filler, daemon, daemon.messages[4]) == []  # held until the run's first heartbeat
    got = _deliver(filler, daemon, _heartbeat({TOPIC: 4}, uptime_s=5.0))
    assert _seqs(got) == [(1, True, 0), (2, True, 0), (3, True, 0), (4, True, 0)]
    assert filler.positions == {RUN: {TOPIC: 4}} and filler.gaps == {}


def test_a_late_joiner_starts_at_the_first_event_it_received():
    """The run was going before the consumer started (uptime 60 s > its age of 10 s): no history, but the
    events received before the first heartbeat are handed out, in order, once it comes."""
    clock, daemon = Clock(), Daemon(sent=5)
    filler = GapFiller(["status."], clock=clock)
    clock.now += 10.0
    assert _deliver(filler, daemon, daemon.messages[3]) + _deliver(filler, daemon, daemon.messages[4]) == []
    got = _deliver(filler, daemon, _heartbeat({TOPIC: 4}, uptime_s=60.0))
    assert _seqs(got) == [(3, False, 0), (4, False, 0)] and daemon.asked == []
    assert _seqs(_deliver(filler, daemon, daemon.messages[5])) == [(5, False, 0)]


def test_a_resumed_consumer_follows_a_new_run_from_seq_1_at_once():
    """Positions saved, the daemon restarted while the consumer was down: the new run began after them."""
    daemon = Daemon(sent=3)
    new_run = RUN
    filler = GapFiller(["status."], positions={uuid.uuid4().hex: {TOPIC: 7}})
    got = _deliver(filler, daemon, daemon.messages[3])
    assert [e.header["run_id"] for e in got] == [new_run] * 3 and _seqs(got) == [(1, True, 0), (2, True, 0), (3, True, 0)]


def test_what_replay_cannot_give_of_a_run_followed_from_seq_1_is_a_gap():
    clock, daemon = Clock(), Daemon(sent=4, down=True)
    filler = GapFiller(["status."], clock=clock)
    clock.now += 10.0
    _deliver(filler, daemon, daemon.messages[4])
    got = _deliver(filler, daemon, _heartbeat({TOPIC: 4}, uptime_s=5.0))
    assert _seqs(got) == [(4, False, 3)] and filler.gaps == {TOPIC: 3} and filler.replay_failures == 1
