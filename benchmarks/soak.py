"""Soak: run the real daemon for a while, watch its memory, then check every camera's frame account.

    python benchmarks/soak.py --seconds 300                  # config.example.toml, ports made free
    python benchmarks/soak.py --config my.toml --seconds 3600

Starts `python -m inspectd run` as a subprocess (the example config with free ports unless --config),
samples its RSS every --every seconds, stops it with SIGTERM and reads the frame accounts it logs at
shutdown ("frames CAM: captured N = inferred I + dropped D (...) + in flight 0; residual R").
Exit 0 when every residual is 0 and RSS grew less than --max-growth-mb after the first minute.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = re.compile(r"frames (?P<camera>\S+): captured (?P<captured>\d+) = inferred (?P<inferred>\d+) \+ dropped "
                     r"(?P<dropped>\d+) \((?P<reasons>[^)]*)\) \+ in flight (?P<in_flight>\d+); residual (?P<residual>-?\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_config(tmp: Path) -> tuple[Path, str]:
    """config.example.toml with free ports (so a soak never collides with a running daemon)."""
    metrics, events = _free_port(), _free_port()
    text = (ROOT / "config.example.toml").read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {metrics}", text)
    text = re.sub(r'(?m)^endpoint = "tcp://127\.0\.0\.1:\d+"', f'endpoint = "tcp://127.0.0.1:{events}"', text)
    path = tmp / "soak.toml"
    path.write_text(text)
    return path, f"http://127.0.0.1:{metrics}"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def soak(config: Path, metrics_url: str | None, seconds: float, every: float, log_path: Path) -> tuple[list, list, int]:
    """-> (RSS samples [(t, MB)], account lines parsed from the shutdown log, the daemon's exit code)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--config", str(config)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while metrics_url and not _ready(metrics_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not become ready; see {log_path}")
                time.sleep(0.5)
            samples, t0 = [], time.monotonic()
            while time.monotonic() - t0 < seconds and proc.poll() is None:
                samples.append((round(time.monotonic() - t0), round(_rss_mb(proc.pid), 1)))
                print(f"t={samples[-1][0]:5d} s  RSS {samples[-1][1]:7.1f} MB", flush=True)
                time.sleep(every)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    accounts = [m.groupdict() for m in map(ACCOUNT.search, log_path.read_text().splitlines()) if m]
    print(f"daemon exited {code}")
    return samples, accounts, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", type=Path, help="daemon config (default: config.example.toml with free ports)")
    ap.add_argument("--metrics-url", help="with --config: the daemon's metrics URL, to wait for /readyz")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--every", type=float, default=10, help="RSS sampling period, seconds")
    ap.add_argument("--max-growth-mb", type=float, default=20, help="allowed RSS growth after the first minute")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, url = (args.config, args.metrics_url) if args.config else _example_config(Path(tmp))
        samples, accounts, code = soak(config, url, args.seconds, args.every, Path(tmp) / "daemon.log")
    settled = [mb for t, mb in samples if t >= 60] or [mb for _, mb in samples]
    growth = settled[-1] - settled[0] if settled else float("nan")
    print(f"RSS after the first minute: {settled[0] if settled else '?'} -> {settled[-1] if settled else '?'} MB "
          f"(growth {growth:.1f} MB, allowed {args.max_growth_mb})")
    print("frame accounts at shutdown:")
    for a in accounts:
        print(f"  {a['camera']}: captured {a['captured']} = inferred {a['inferred']} + dropped {a['dropped']} "
              f"({a['reasons']}) + in flight {a['in_flight']}; residual {a['residual']}")
    balanced = bool(accounts) and all(int(a["residual"]) == 0 and int(a["in_flight"]) == 0 for a in accounts)
    ok = code == 0 and balanced and growth < args.max_growth_mb
    print("OK" if ok else "FAILED: " + ("daemon exit code" if code else "no frame accounts logged" if not accounts
                                        else "residual or RSS growth"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
