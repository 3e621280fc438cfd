"""Cold start: seconds from `inspectd run` to the first inspected frame's event, with an empty cache and then cached.

    benchmarks/coldstart.py --inspectd .venv-slim/bin/inspectd            # the slim install, builtin:demo exported
    benchmarks/coldstart.py --inspectd .venv/bin/inspectd --runs 3        # the full install, builtin:demo .keras

Each run starts the daemon on a fresh config (one synthetic 320x240 camera at 10 frames/s, `results = true`,
`runtime = "auto"` unless --runtime), subscribes to its events before it starts, and stops it at the first
`result.` message. Run 1 uses an empty `cache_dir` (conversion and `auto`'s measuring included); the others reuse
it. Also prints the size of the install's venv (`du`). Results in docs/performance.md#cold-start-and-install-size.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(inspectd: str, model: str, runtime: str, cache: Path, folder: Path) -> float:
    events, metrics = _port(), _port()
    config = folder / "inspectd.toml"
    config.write_text(
        f'[model]\npath = "{model}"\nruntime = "{runtime}"\ncache_dir = "{cache}"\n'
        f'[metrics]\nhost = "127.0.0.1"\nport = {metrics}\n'
        f'[publish]\nendpoint = "tcp://127.0.0.1:{events}"\nresults = true\n'
        '[[cameras]]\nid = "a"\nurl = "synthetic://?fps=10"\n'
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"result.")
    sub.connect(f"tcp://127.0.0.1:{events}")
    t0 = time.monotonic()
    with open(folder / "daemon.log", "w") as log:
        proc = subprocess.Popen([inspectd, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.monotonic() - t0 < 300:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited {proc.returncode}: {(folder / 'daemon.log').read_text()[-2000:]}")
            if sub.poll(100):
                sub.recv_multipart()
                return time.monotonic() - t0
        raise SystemExit("no result within 300 s")
    finally:
        proc.terminate()
        proc.wait(60)
        sub.close(0)
        ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inspectd", required=True, help="the install's inspectd executable")
    ap.add_argument("--model", default="builtin:demo")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--runs", type=int, default=3, help="starts: the first with an empty cache")
    args = ap.parse_args()
    venv = Path(args.inspectd).resolve().parents[1]
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0]
    with tempfile.TemporaryDirectory(prefix="inspectd-coldstart-") as tmp:
        cache = Path(tmp) / "cache"
        seconds = [round(one_start(args.inspectd, args.model, args.runtime, cache, Path(tmp)), 2) for _ in range(args.runs)]
    result = {"venv": str(venv), "venv_mb": int(size), "model": args.model, "runtime": args.runtime, "first_frame_s": seconds}
    print(json.dumps(result))
    print(f"{venv}: {size} MB; first frame after {seconds[0]} s with an empty cache, {seconds[1:]} s cached", file=sys.stderr)


if __name__ == "__main__":
    main()
