"""Replay end to end: a real daemon, and a consumer (`inspectd watch --replay --state`) stopped in the
middle of a defect burst and started again: together its two runs print every seq once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from daemon_util import ROOT, DaemonProcess, camera_toml, daemon_config
from support import dies_with_tests, free_port, scrape, wait_until

pytestmark = pytest.mark.slow

BURST = "synthetic://?fps=10&width=160&height=128&defect_rate=1&seed=7"  # every frame a defect


class Watch:
    """`inspectd watch --json` as a subprocess, its stdout in a file."""

    def __init__(self, tmp_path, name: str, *args: str):
        self.out = tmp_path / f"{name}.jsonl"
        self.err = tmp_path / f"{name}.err"
        self.proc = subprocess.Popen(
            dies_with_tests([sys.executable, "-m", "inspectd", "watch", *args, "--json"]),
            cwd=ROOT,
            stdout=open(self.out, "w"),
            stderr=open(self.err, "w"),
        )

    def seqs(self) -> list[int]:
        return [json.loads(line)["seq"] for line in self.out.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_a_consumer_restarted_mid_burst_ends_with_every_seq_once(tmp_path):
    replay = f"tcp://127.0.0.1:{free_port()}"
    config, urls = daemon_config(tmp_path, camera_toml("cam-1", BURST), replay={"endpoint": replay})
    state = tmp_path / "watch.state"
    args = (urls["events"], "--topic", "defect.", "--replay", replay, "--state", str(state))

    def published() -> int:
        return int(scrape(urls["metrics"]).value("inspectd_events_published_total", topic="defect.cam-1") or 0)

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        first = Watch(tmp_path, "first", *args)
        wait_until(lambda: len(first.seqs()) >= 5, 60, lambda: f"5 events printed: {first.err.read_text()}")
        assert first.stop() == 0  # SIGTERM: a clean exit between two events
        stopped_at = first.seqs()[-1]
        run_id = json.loads(first.out.read_text().splitlines()[-1])["run_id"]
        assert json.loads(state.read_text())[run_id]["defect.cam-1"] == stopped_at
        wait_until(lambda: published() >= stopped_at + 10, 60, "10 defects published while the consumer is away")
        second = Watch(tmp_path, "second", *args)
        target = published() + 3
        wait_until(
            lambda: second.seqs() and second.seqs()[-1] >= target,
            60,
            lambda: f"the second consumer at seq {target}: {second.seqs()[-5:]} {second.err.read_text()}",
        )
        assert second.stop() == 0
        assert daemon.terminate() == 0, daemon.log()
    a, b = first.seqs(), second.seqs()
    together = a + b
    assert len(together) == len(set(together)), f"printed twice: {sorted(s for s in set(together) if together.count(s) > 1)}"
    assert together == list(range(a[0], b[-1] + 1)), (a, b)  # none missing, in order
    assert b[0] == a[-1] + 1  # the second run began with what the first one had not printed: replayed


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_a_flood_of_replay_requests_that_are_never_read_is_bounded(tmp_path):
    """50 consumers each ask for the whole ring (300 defect events with 640x480 frames, ~50 KB each) and never
    read: the daemon keeps at most [replay] peer_queue (16) messages for each, so its memory grows by a few
    tens of MB (it grew by 0.9-1.9 GB, for good, with 1000 queued per consumer), and a consumer that reads is
    answered at once meanwhile (it waited 10-15 s behind the flood). Generous limits here; the measured
    numbers are in docs/performance.md (benchmarks/replay_flood.py)."""
    import zmq

    from inspectd.client import ReplayClient, Subscriber

    cams = camera_toml("big", "synthetic://?fps=30&width=640&height=480&defect_rate=1&seed=5")
    replay = f"tcp://127.0.0.1:{free_port()}"
    config, urls = daemon_config(tmp_path, cams, replay={"endpoint": replay}, publish={"attach_frame": True})
    ctx = zmq.Context()
    flood: list[zmq.Socket] = []
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])

        def published() -> float:
            return scrape(urls["metrics"]).value("inspectd_events_published_total", topic="defect.big") or 0

        wait_until(lambda: published() >= 300, 120, lambda: f"300 defects published, {published()} so far")
        with Subscriber(urls["events"], ["heartbeat"]) as sub:
            beat = sub.recv(10)
        assert beat is not None
        run_id = beat.header["run_id"]
        before = _rss_mb(daemon.proc.pid)
        request = [b"inspectd.replay/1", json.dumps({"run_id": run_id, "topic": "defect.big", "after_seq": 0}).encode()]
        try:
            for _ in range(50):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 1)  # never read: what piles up, piles up at the daemon
                sock.connect(replay)
                sock.send_multipart(request)
                flood.append(sock)
            good = ReplayClient(ctx, replay, timeout_s=10)
            last = int(published())
            took = []
            for _ in range(3):
                start = time.monotonic()
                messages, end = good.fetch(run_id, "defect.big", last - 5)
                took.append(time.monotonic() - start)
                assert end["status"] in ("complete", "partial") and messages, end
            samples = []
            for _ in range(10):
                samples.append(_rss_mb(daemon.proc.pid))
                time.sleep(0.5)  # sampling the memory over 5 s, not waiting for a condition
            growth = max(samples) - before
            good.close()
        finally:
            for sock in flood:
                sock.close(0)
            ctx.term()
        print(f"replay flood: RSS +{growth:.0f} MB with 50 consumers not reading; a reader answered in {max(took):.2f} s")
        assert growth < 300, f"RSS grew {growth:.0f} MB"
        assert max(took) < 5, took
        assert daemon.terminate() == 0, daemon.log()
