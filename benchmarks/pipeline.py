#!/usr/bin/env python
"""Pipeline benchmark (not run in CI): full-pipeline frames/s next to the bare model's, same batch size, one run.

    .venv/bin/python benchmarks/pipeline.py [--batches 1 2 4] [--seconds 20] [--model builtin:demo] [--size 320x240]

For each batch size, `inspectd bench` measures the bare model (InferenceEngine in a loop) and then
the real daemon in-process with synthetic cameras faster than the model. Prints a Markdown table
(copied into docs/performance.md with the command) and writes runs/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--model", default="builtin:demo")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--cameras", type=int, default=2, help="at least the batch size, so batches can fill")
    ap.add_argument("--camera-fps", type=float, default=100)
    args = ap.parse_args()
    rows = []
    for batch in args.batches:
        cmd = [sys.executable, "-m", "inspectd", "bench", "--json", "--batch", str(batch), "--seconds", str(args.seconds),
               "--model", args.model, "--size", args.size, "--cameras", str(max(args.cameras, batch)),
               "--camera-fps", str(args.camera_fps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"batch {batch}: done", file=sys.stderr, flush=True)
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "pipeline.json").write_text(json.dumps(rows, indent=2))
    print(f"command: `{' '.join(sys.argv)}`; device {rows[0]['bare_model']['device']}\n")
    print("| batch | bare model frames/s | full pipeline frames/s | pipeline / bare | captured frames/s | "
          "stale drops | end-to-end p50 / p99 (s, bucket bound) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, p = r["bare_model"], r["pipeline"]
        print(f"| {r['options']['batch']} | {b['fps']:.1f} | {p['fps']:.1f} | {100 * p['fps'] / b['fps']:.0f} % | "
              f"{p['captured_fps']:.1f} | {p['stale_dropped']} | {p['end_to_end_p50_s']} / {p['end_to_end_p99_s']} |")


if __name__ == "__main__":
    main()
