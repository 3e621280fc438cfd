"""What the live view costs inspection: inspected frames/s with viewers open vs with none, same daemon, same run.

    python benchmarks/live_view.py --out benchmarks/results/live-view            # 2 cameras, 320x240, saturated
    python benchmarks/live_view.py --width 640 --height 480 --out benchmarks/results/live-view-640

Starts `python -m inspectd run` on config.example.toml (the demo model, its runtime choice, [ui] on) with
free ports and the synthetic cameras offering more frames than the model can inspect (--fps each), so the
CPU is saturated and anything the live view takes shows as fewer frames inspected. Then alternates
phases without viewers and with --viewers viewers, --rounds times, each phase --phase-s seconds after
--settle-s seconds, and reads `inspectd_frames_inferred_total` from /metrics at each phase's start and end.

A viewer does what the page does: one MJPEG stream per camera (read to the end of every picture),
/api/state every second, /api/defects every 2 s and the thumbnail of every new defect. Viewers are HTTP
clients in this process, not browsers: on a line the browser runs on another machine, and a headless
browser's own rendering on these 2 cores would be measured as the daemon's cost.

Writes OUT.json and OUT.md (the table for docs/performance.md). Exit 0 when the ratio (mean inspected
frames/s with viewers / without) is at least --target (0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = b"--inspectd-frame"
VISIBLE_THUMBS = 4  # recent defects on screen in the page's list (1280x900 window)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, args) -> tuple[Path, str, str]:
    """config.example.toml with free ports, saturating cameras, the live view on."""
    metrics, ui, events = _free_port(), _free_port(), _free_port()
    text = (ROOT / "config.example.toml").read_text()
    text = re.sub(
        r"synthetic://\?fps=\d+&width=\d+&height=\d+",
        f"synthetic://?fps={args.fps}&width={args.width}&height={args.height}",
        text,
    )
    text = text.replace("port = 9108", f"port = {metrics}").replace("port = 8080", f"port = {ui}")
    text = text.replace('endpoint = "tcp://127.0.0.1:5556"', f'endpoint = "tcp://127.0.0.1:{events}"')
    text = text.replace('endpoint = "tcp://127.0.0.1:5557"', 'endpoint = ""')
    path = tmp / "inspectd.toml"
    path.write_text(text)
    return path, f"http://127.0.0.1:{metrics}", f"http://127.0.0.1:{ui}"


def _inspected(metrics_url: str) -> float:
    text = urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("inspectd_frames_inferred_total{"))


class Viewer:
    """One open page: a stream per camera, the state and defect polls, new thumbnails."""

    def __init__(self, ui_url: str, cameras: list[str], streams: bool = True, polls: bool = True):
        self.ui_url, self.cameras = ui_url, cameras
        self.stop = threading.Event()
        self.pictures = 0
        self.requests = 0
        self._threads = [threading.Thread(target=self._stream, args=(c,), daemon=True) for c in cameras if streams]
        if polls:
            self._threads.append(threading.Thread(target=self._poll, daemon=True))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _stream(self, camera: str) -> None:
        with urllib.request.urlopen(f"{self.ui_url}/stream?camera={camera}", timeout=10) as r:
            tail = b""
            while not self.stop.is_set():
                chunk = r.read1(65536)
                if not chunk:
                    return
                data = tail + chunk
                self.pictures += data.count(BOUNDARY)
                tail = data[-len(BOUNDARY) :]

    def _poll(self) -> None:
        seen: set[str] = set()
        next_defects = 0.0
        while not self.stop.wait(1.0):
            urllib.request.urlopen(f"{self.ui_url}/api/state", timeout=5).read()
            self.requests += 1
            if time.monotonic() >= next_defects:
                next_defects = time.monotonic() + 2.0
                listed = json.loads(urllib.request.urlopen(f"{self.ui_url}/api/defects", timeout=5).read())["defects"]
                # The page loads thumbnails lazily: those in view, about the newest VISIBLE_THUMBS.
                for d in listed[:VISIBLE_THUMBS]:
                    if d["id"] not in seen:
                        seen.add(d["id"])
                        try:
                            urllib.request.urlopen(f"{self.ui_url}/defect/thumb?id={d['id']}", timeout=5).read()
                        except urllib.error.HTTPError:  # gone from the ring meanwhile, as on the page
                            pass
                        self.requests += 1
                self.requests += 1


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (OS-level thread name, CPU seconds) of every thread of the process (the daemon names its own:
    inference, live-render, ui-req for the live view's HTTP requests)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[task.name] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


VIEW_THREADS = ("live-render", "ui-req")


def _phase(metrics_url: str, pid: int, settle_s: float, seconds: float) -> dict:
    """Over `seconds` after `settle_s`: inspected frames/s, the daemon's CPU, this process' (the viewers') CPU,
    and per-thread CPU (% of one core) of the live view's threads and of inference, for the threads that lived
    through the phase (a poll's request thread lives milliseconds and is not counted)."""
    time.sleep(settle_s)
    n0, c0, v0, th0, t0 = (_inspected(metrics_url), _cpu_s(pid), _cpu_s(os.getpid()), _threads(pid), time.monotonic())
    time.sleep(seconds)
    dt = time.monotonic() - t0
    th1 = _threads(pid)
    per = {}
    for tid, (name, cpu) in th1.items():
        if tid in th0:
            per[name] = per.get(name, 0.0) + 100.0 * (cpu - th0[tid][1]) / dt
    return {
        "fps": (_inspected(metrics_url) - n0) / dt,
        "cpu": 100.0 * (_cpu_s(pid) - c0) / dt,
        "client": 100.0 * (_cpu_s(os.getpid()) - v0) / dt,
        "view_threads": sum(v for k, v in per.items() if k in VIEW_THREADS),
        "inference": per.get("inference", 0.0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fps", type=int, default=100, help="frames/s each synthetic camera offers (default 100)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--viewers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--phase-s", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--no-streams", action="store_true", help="viewers only poll (to tell the costs apart)")
    ap.add_argument("--no-polls", action="store_true", help="viewers only stream (to tell the costs apart)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "live-view")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, metrics_url, ui_url = _config(Path(tmp), args)
        log = open(Path(tmp) / "daemon.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "run", "--config", str(config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            for _ in range(600):
                try:
                    if urllib.request.urlopen(f"{metrics_url}/readyz", timeout=1).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            cameras = [c["id"] for c in json.loads(urllib.request.urlopen(f"{ui_url}/api/state").read())["cameras"]]
            rows = []
            for r in range(args.rounds):
                for viewers in (0, args.viewers) if r % 2 == 0 else (args.viewers, 0):  # ABBA: drift cancels
                    if viewers:
                        pages = [Viewer(ui_url, cameras, not args.no_streams, not args.no_polls) for _ in range(viewers)]
                        for p in pages:
                            p.__enter__()
                        phase = _phase(metrics_url, proc.pid, args.settle_s, args.phase_s)
                        pictures = sum(p.pictures for p in pages) / (args.settle_s + args.phase_s)
                        for p in pages:
                            p.__exit__()
                    else:
                        phase, pictures = _phase(metrics_url, proc.pid, args.settle_s, args.phase_s), 0.0
                    fps, cpu, client = phase["fps"], phase["cpu"], phase["client"]
                    rows.append(
                        {
                            "round": r + 1,
                            "viewers": viewers,
                            "inspected_fps": round(fps, 2),
                            "daemon_cpu_percent": round(cpu, 1),
                            "viewers_cpu_percent": round(client, 1),
                            "view_threads_cpu_percent": round(phase["view_threads"], 2),
                            "inference_thread_cpu_percent": round(phase["inference"], 1),
                            "pictures_per_s_received": round(pictures, 2),
                        }
                    )
                    print(
                        f"round {r + 1}: {viewers} viewer(s): {fps:.2f} frames/s inspected, daemon CPU {cpu:.1f} %, "
                        f"the view's threads {phase['view_threads']:.2f} %, inference thread {phase['inference']:.1f} %, "
                        f"viewers' CPU {client:.1f} %" + (f", {pictures:.1f} pictures/s received in all" if viewers else ""),
                        flush=True,
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            log.close()
        ready_line = next((line for line in (Path(tmp) / "daemon.log").read_text().splitlines() if "ready:" in line), "")
    none = [r["inspected_fps"] for r in rows if r["viewers"] == 0]
    some = [r["inspected_fps"] for r in rows if r["viewers"]]
    ratio = statistics.mean(some) / statistics.mean(none)
    cpu_none = [r["daemon_cpu_percent"] for r in rows if r["viewers"] == 0]
    cpu_some = [r["daemon_cpu_percent"] for r in rows if r["viewers"]]
    pairs = [
        b["inspected_fps"] / a["inspected_fps"]
        for a, b in zip([r for r in rows if r["viewers"] == 0], [r for r in rows if r["viewers"]])
    ]
    result = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU used",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "cameras": len(cameras),
        "frame": f"{args.width}x{args.height}",
        "offered_fps_per_camera": args.fps,
        "viewers": args.viewers,
        "phase_s": args.phase_s,
        "rows": rows,
        "mean_none": round(statistics.mean(none), 2),
        "mean_viewers": round(statistics.mean(some), 2),
        "ratio": round(ratio, 4),
        "cpu_none": round(statistics.mean(cpu_none), 1),
        "cpu_viewers": round(statistics.mean(cpu_some), 1),
        "view_threads_viewers": round(statistics.mean(r["view_threads_cpu_percent"] for r in rows if r["viewers"]), 2),
        "inference_none": round(statistics.mean(r["inference_thread_cpu_percent"] for r in rows if not r["viewers"]), 1),
        "inference_viewers": round(statistics.mean(r["inference_thread_cpu_percent"] for r in rows if r["viewers"]), 1),
        "round_ratios": [round(p, 4) for p in pairs],
        "target": args.target,
        "daemon": ready_line.split(": ", 1)[-1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`{result['command']}` — {result['machine']}; {result['when']}; {len(cameras)} synthetic cameras "
        f"{args.width}x{args.height} offering {args.fps} frames/s each; {args.viewers} viewers, each "
        f"streaming every camera and polling like the page; phases of {args.phase_s:g} s",
        "",
        "| round | viewers | frames/s inspected | daemon CPU % (of one core) | the view's threads CPU % | "
        "inference thread CPU % | the viewers' CPU % (this process) | pictures/s received (all viewers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['round']} | {r['viewers']} | {r['inspected_fps']} | {r['daemon_cpu_percent']} | "
        f"{r['view_threads_cpu_percent']} | {r['inference_thread_cpu_percent']} | "
        f"{r['viewers_cpu_percent']} | {r['pictures_per_s_received'] or '-'} |"
        for r in rows
    ]
    lines += [
        "",
        f"Mean without viewers {result['mean_none']} frames/s, with {args.viewers} viewers "
        f"{result['mean_viewers']} frames/s: **ratio {ratio:.3f}** (per round: "
        f"{', '.join(f'{p:.3f}' for p in pairs)}); target >= {args.target}: "
        f"{'met' if ratio >= args.target else 'NOT MET'}. The daemon's CPU: {result['cpu_none']} % without "
        f"viewers, {result['cpu_viewers']} % with; the view's own threads (render, streams) "
        f"{result['view_threads_viewers']} % of one core with viewers; the inference thread "
        f"{result['inference_none']} % without, {result['inference_viewers']} % with.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ratio >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
