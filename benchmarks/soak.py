"""Soak: run the real daemon for a while with the archive and replay on, sample its resources, then
check every camera's frame account and that a consumer got every defect event.

    python benchmarks/soak.py --seconds 1800 --csv docs/img/soak.csv --plot docs/img/soak.png
    python benchmarks/soak.py --config my.toml --metrics-url http://127.0.0.1:9108 --seconds 3600

Starts `python -m inspectd run` as a subprocess: by default config.example.toml with free ports, the
archive on in a temporary folder with a small `--archive-max-bytes` (so retention works during the
soak and the archive's size must level off), and `[replay]` on. Every --every seconds it samples
the daemon's RSS, open files and threads (/proc) and, from /metrics, inspected frames/s and the
archive's size; meanwhile a consumer (`inspectd.client.Subscriber` with replay) receives every
defect event. At the end it stops the daemon with SIGTERM and reads the frame accounts it logs.
Writes the samples as CSV and a plot. Exit 0 when every residual is 0, the daemon exited 0, the
consumer saw no gap and handed nothing out twice, and after the warm-up (--settle seconds) RSS grew
less than --max-growth-mb while open files and threads stayed within --max-fd-drift of their first
value.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = re.compile(
    r"frames (?P<camera>\S+): captured (?P<captured>\d+) = inferred (?P<inferred>\d+) \+ dropped "
    r"(?P<dropped>\d+) \((?P<reasons>[^)]*)\) \+ in flight (?P<in_flight>\d+); residual (?P<residual>-?\d+)"
)
FIELDS = ("t_s", "rss_mb", "open_files", "threads", "frames_per_s", "archive_mb", "archive_entries", "events_received")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_config(tmp: Path, archive_max_bytes: int) -> tuple[Path, dict]:
    """config.example.toml with free ports (a soak never collides with a running daemon), the archive on."""
    metrics, events, replay = _free_port(), _free_port(), _free_port()
    text = (ROOT / "config.example.toml").read_text()
    text = re.sub(r"(?m)^port = 9108", f"port = {metrics}", text)
    text = re.sub(r"(?m)^port = 8080", f"port = {_free_port()}", text)  # the live view's
    text = re.sub(r'(?m)^endpoint = "tcp://127\.0\.0\.1:5556"', f'endpoint = "tcp://127.0.0.1:{events}"', text)
    text = re.sub(r'(?m)^endpoint = "tcp://127\.0\.0\.1:5557"', f'endpoint = "tcp://127.0.0.1:{replay}"', text)
    text = re.sub(r'(?m)^dir = ""', f'dir = "{tmp / "archive"}"', text)
    text = re.sub(r"(?m)^max_bytes = 10_000_000_000", f"max_bytes = {archive_max_bytes}", text)
    path = tmp / "soak.toml"
    path.write_text(text)
    return path, {
        "metrics": f"http://127.0.0.1:{metrics}",
        "events": f"tcp://127.0.0.1:{events}",
        "replay": f"tcp://127.0.0.1:{replay}",
    }


def _proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) from /proc."""
    rss, threads = float("nan"), -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def _metrics(url: str) -> dict[str, float]:
    """Sums of the samples we plot, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"inferred": 0.0, "archive_bytes": 0.0, "archive_entries": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "inspectd_frames_inferred_total":
                out["inferred"] += s.value
            elif s.name == "inspectd_archive_bytes":
                out["archive_bytes"] = s.value
            elif s.name == "inspectd_archive_entries":
                out["archive_entries"] = s.value
    return out


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Consumer(threading.Thread):
    """Receives every defect event with replay on; counts them, gaps and anything handed out twice."""

    def __init__(self, events: str, replay: str | None):
        super().__init__(daemon=True)
        from inspectd.client import Subscriber

        self.sub = Subscriber(events, ["defect."], decode=False, replay=replay)
        self.received = self.replayed = self.twice = 0
        self.seen: set[tuple[str, str, int]] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            ev = self.sub.recv(timeout_s=0.5)
            if ev is None:
                continue
            key = (ev.header["run_id"], ev.topic, ev.header["seq"])
            self.twice += key in self.seen
            self.seen.add(key)
            self.received += 1
            self.replayed += ev.replayed
        self.sub.close()


def soak(config: Path, urls: dict, seconds: float, every: float, log_path: Path) -> tuple[list[dict], list, int, Consumer]:
    """-> (samples, account lines parsed from the shutdown log, the daemon's exit code, the consumer)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "run", "--config", str(config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        consumer = None
        try:
            deadline = time.monotonic() + 180
            while not _ready(urls["metrics"]):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not become ready; see {log_path}")
                time.sleep(0.5)
            consumer = Consumer(urls["events"], urls.get("replay"))
            consumer.start()
            samples, t0 = [], time.monotonic()
            last = (t0, _metrics(urls["metrics"])["inferred"])
            while time.monotonic() - t0 < seconds and proc.poll() is None:
                time.sleep(every)
                now, m = time.monotonic(), _metrics(urls["metrics"])
                rss, threads = _proc_status(proc.pid)
                samples.append(
                    {
                        "t_s": round(now - t0),
                        "rss_mb": round(rss, 1),
                        "open_files": len(os.listdir(f"/proc/{proc.pid}/fd")),
                        "threads": threads,
                        "frames_per_s": round((m["inferred"] - last[1]) / (now - last[0]), 2),
                        "archive_mb": round(m["archive_bytes"] / 1e6, 2),
                        "archive_entries": int(m["archive_entries"]),
                        "events_received": consumer.received,
                    }
                )
                last = (now, m["inferred"])
                print("  ".join(f"{k} {v}" for k, v in samples[-1].items()), flush=True)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if consumer is not None:
                consumer.stop.set()
                consumer.join(10)
    accounts = [m.groupdict() for m in map(ACCOUNT.search, log_path.read_text().splitlines()) if m]
    print(f"daemon exited {code}")
    return samples, accounts, code, consumer


def write_csv(samples: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(samples)


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    panels = (
        ("rss_mb", "RSS (MB)"),
        ("open_files", "open files"),
        ("threads", "threads"),
        ("frames_per_s", "inspected frames/s"),
        ("archive_mb", "archive (MB)"),
        ("events_received", "defect events received"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot(t, [s[key] for s in samples], lw=1.2)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", type=Path, help="daemon config (default: config.example.toml with free ports, archive on)")
    ap.add_argument("--metrics-url", help="with --config: the daemon's metrics URL")
    ap.add_argument("--events", help="with --config: the daemon's publish endpoint (for the consumer)")
    ap.add_argument("--replay", help="with --config: the daemon's replay endpoint")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--every", type=float, default=10, help="sampling period, seconds")
    ap.add_argument("--settle", type=float, default=120, help="warm-up excluded from the flatness checks, seconds")
    ap.add_argument("--archive-max-bytes", type=int, default=20_000_000, help="archive size limit (default config)")
    ap.add_argument("--max-growth-mb", type=float, default=20, help="allowed RSS growth after --settle")
    ap.add_argument("--max-fd-drift", type=int, default=4, help="allowed change of open files and threads after --settle")
    ap.add_argument("--csv", type=Path, help="write the samples here")
    ap.add_argument("--plot", type=Path, help="write a PNG plot of the samples here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            config, urls = args.config, {"metrics": args.metrics_url, "events": args.events, "replay": args.replay}
            if not args.metrics_url or not args.events:
                ap.error("--config needs --metrics-url and --events")
        else:
            config, urls = _example_config(Path(tmp), args.archive_max_bytes)
        samples, accounts, code, consumer = soak(config, urls, args.seconds, args.every, Path(tmp) / "daemon.log")
    if args.csv:
        write_csv(samples, args.csv)
    settled = [s for s in samples if s["t_s"] >= args.settle] or samples
    growth = settled[-1]["rss_mb"] - settled[0]["rss_mb"] if settled else float("nan")
    drift = {k: max(abs(s[k] - settled[0][k]) for s in settled) if settled else 0 for k in ("open_files", "threads")}
    print(
        f"after {args.settle:g} s: RSS {settled[0]['rss_mb']} -> {settled[-1]['rss_mb']} MB (growth {growth:.1f} MB, "
        f"allowed {args.max_growth_mb}); open files {settled[0]['open_files']} -> {settled[-1]['open_files']}, "
        f"threads {settled[0]['threads']} -> {settled[-1]['threads']} (largest drift {drift}); archive "
        f"{settled[-1]['archive_mb']} MB, {settled[-1]['archive_entries']} entries"
    )
    print(
        f"consumer: {consumer.received} defect events, {consumer.replayed} through replay, gaps {consumer.sub.gaps}, "
        f"handed out twice {consumer.twice}"
    )
    print("frame accounts at shutdown:")
    for a in accounts:
        print(
            f"  {a['camera']}: captured {a['captured']} = inferred {a['inferred']} + dropped {a['dropped']} "
            f"({a['reasons']}) + in flight {a['in_flight']}; residual {a['residual']}"
        )
    if args.plot:
        plot(
            samples,
            args.plot,
            f"inspectd soak: {args.seconds / 60:g} min, archive on (limit "
            f"{args.archive_max_bytes / 1e6:g} MB), replay on, sampled every {args.every:g} s",
        )
    balanced = bool(accounts) and all(int(a["residual"]) == 0 and int(a["in_flight"]) == 0 for a in accounts)
    flat = growth < args.max_growth_mb and all(v <= args.max_fd_drift for v in drift.values())
    lossless = not consumer.sub.gaps and consumer.twice == 0 and consumer.received > 0
    ok = code == 0 and balanced and flat and lossless
    print(
        "OK"
        if ok
        else "FAILED: "
        + ", ".join(
            what
            for what, bad in (
                ("daemon exit code", code != 0),
                ("frame accounts", not balanced),
                ("resources not flat", not flat),
                ("consumer lost or repeated events", not lossless),
            )
            if bad
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
