"""Replay end to end: a real daemon, and a consumer (`inspectd watch --replay --state`) stopped in the
middle of a defect burst and started again: together its two runs print every seq once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from daemon_util import ROOT, DaemonProcess, camera_toml, daemon_config
from support import free_port, scrape, wait_until

pytestmark = pytest.mark.slow

BURST = "synthetic://?fps=10&width=160&height=128&defect_rate=1&seed=7"  # every frame a defect


class Watch:
    """`inspectd watch --json` as a subprocess, its stdout in a file."""

    def __init__(self, tmp_path, name: str, *args: str):
        self.out = tmp_path / f"{name}.jsonl"
        self.err = tmp_path / f"{name}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "watch", *args, "--json"],
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
