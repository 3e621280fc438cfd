"""Replay under a flood: consumers that ask for everything and never read, against a real daemon.

    python benchmarks/replay_flood.py                      # 50 peers, peer_queue 16 and 1000
    python benchmarks/replay_flood.py --peers 200 --queue 16 --queue 64

For each `[replay] peer_queue` given: starts `python -m inspectd run` (one synthetic camera at 640x480,
every frame a defect, frames attached: ~50 KB per event), waits for --events defects, then connects
--peers DEALER sockets that each ask for the whole ring and never read. Reports the daemon's RSS growth
(the most of 10 samples over 5 s after the flood) and how long a consumer that reads waits for three
small answers meanwhile. The daemon is a separate process: the flood's own memory is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon_util import DaemonProcess, camera_toml, daemon_config  # noqa: E402  (the tests' daemon helpers)
from support import free_port, scrape, wait_until  # noqa: E402

from inspectd.client import ReplayClient, Subscriber  # noqa: E402


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def measure(tmp: Path, peer_queue: int, peers: int, events: int) -> dict:
    cams = camera_toml("big", "synthetic://?fps=30&width=640&height=480&defect_rate=1&seed=5")
    replay = f"tcp://127.0.0.1:{free_port()}"
    config, urls = daemon_config(tmp, cams, replay={"endpoint": replay, "peer_queue": peer_queue}, publish={"attach_frame": True})
    ctx = zmq.Context()
    flood: list[zmq.Socket] = []
    with DaemonProcess(config, tmp / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], ["heartbeat"]) as sub:
            beat = sub.recv(10)
        run_id = beat.header["run_id"] if beat is not None else ""

        def published() -> float:
            return scrape(urls["metrics"]).value("inspectd_events_published_total", topic="defect.big") or 0

        wait_until(lambda: published() >= events, 300, f"{events} defects published")
        before = _rss_mb(daemon.proc.pid)
        request = [b"inspectd.replay/1", json.dumps({"run_id": run_id, "topic": "defect.big", "after_seq": 0}).encode()]
        for _ in range(peers):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.connect(replay)
            sock.send_multipart(request)
            flood.append(sock)
        good = ReplayClient(ctx, replay, timeout_s=30)
        took = []
        for _ in range(3):
            start = time.monotonic()
            good.fetch(run_id, "defect.big", int(published()) - 5)
            took.append(time.monotonic() - start)
        samples = []
        for _ in range(10):
            samples.append(_rss_mb(daemon.proc.pid))
            time.sleep(0.5)
        good.close()
        for sock in flood:
            sock.close(0)
        ctx.term()
        daemon.terminate()
    return {
        "peer_queue": peer_queue,
        "peers": peers,
        "rss_before_mb": before,
        "rss_growth_mb": max(samples) - before,
        "reader_wait_max_s": max(took),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=50)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--queue", type=int, action="append", help="[replay] peer_queue values (default 16 and 1000)")
    args = parser.parse_args()
    import tempfile

    print("| peer_queue | peers not reading | RSS before | RSS growth | a reader's longest wait |")
    print("|---:|---:|---:|---:|---:|")
    for queue in args.queue or [16, 1000]:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), queue, args.peers, args.events)
        print(
            f"| {queue} | {r['peers']} | {r['rss_before_mb']:.0f} MB | +{r['rss_growth_mb']:.0f} MB | "
            f"{r['reader_wait_max_s']:.3f} s |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
