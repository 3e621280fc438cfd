"""The archive's cost: bytes per entry and entries written per second, by frame size and frame format.

    .venv/bin/python benchmarks/archive.py [--dir /var/lib/inspectd/bench] [--seconds 5]

Frames are the synthetic camera's textured surfaces with a defect (`inspectd.synth.render`),
post-processed exactly as the daemon does (mask PNG, regions PNG, the frame in the archive's
format); each entry is written by `write_entry` (temporary folder, fsync of every file and of both
folders, rename) on the disk of `--dir`, one after another, as the archive's writer thread does.
Encoding happens on the post-processing threads in the daemon, so it is timed apart. Results go
to docs/archive.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from inspectd.frames import Frame
from inspectd.outputs.archive import message_entry, write_entry
from inspectd.outputs.wire import encode_message, inspection_body
from inspectd.pipeline.postprocess import InspectOptions, inspect
from inspectd.synth import render

SIZES = ((320, 240), (1280, 720), (1920, 1080))
MODEL = {"name": "bench", "sha256": "0" * 64}


def _inspection(rng: np.random.Generator, width: int, height: int, seq: int, fmt: str):
    sample = render(rng, width, height, defect=True)
    image = np.repeat(sample.image[:, :, None], 3, axis=2)  # the camera delivers RGB
    frame = Frame("bench", seq, time.time(), time.monotonic(), image)
    logits = np.full((height // 16, width // 16), -4.0, np.float32)
    y, x = (int(v) // 16 for v in np.argwhere(sample.mask > 0).mean(axis=0)) if sample.mask.any() else (2, 2)
    logits[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 4.0
    t0 = time.perf_counter()
    insp = inspect(frame, 0.9, logits, InspectOptions(threshold=0.5, archive_frame=fmt))
    return insp, time.perf_counter() - t0


def _entry(insp, seq: int, fmt: str):
    insp = replace(insp, frame=replace(insp.frame, seq=seq))  # a new entry name each time
    body, parts = inspection_body(insp, MODEL, with_frame=True)
    wire = encode_message("defect.bench", "bench", seq, body, parts)
    return message_entry(wire[1], wire[2:], ((f"frame.{'jpg' if fmt == 'jpeg' else 'png'}", insp.archive_frame),))


def measure(root: Path, width: int, height: int, fmt: str, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    samples = [_inspection(rng, width, height, i, fmt) for i in range(8)]
    sizes, n, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        insp, _ = samples[n % len(samples)]
        sizes.append(write_entry(root, _entry(insp, n + 1, fmt)))
        n += 1
    elapsed = time.perf_counter() - t0
    return {
        "size": f"{width}x{height}",
        "format": fmt,
        "entry_kB": statistics.median(sizes) / 1000,
        "entries_per_s": n / elapsed,
        "postprocess_ms": 1000 * statistics.median(t for _, t in samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="a folder on the disk to measure (default: a temporary folder)")
    ap.add_argument("--seconds", type=float, default=5.0, help="writing time per configuration")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="inspectd-archive-bench-"))
    try:
        print("| frame | format | entry (median) | entries/s written | post-processing incl. encoding |")
        print("|---|---|---|---|---|")
        for width, height in SIZES:
            for fmt in ("jpeg", "png"):
                r = measure(base / f"{width}x{height}-{fmt}", width, height, fmt, args.seconds)
                print(
                    f"| {r['size']} | {fmt} | {r['entry_kB']:.0f} kB | {r['entries_per_s']:.0f} | {r['postprocess_ms']:.0f} ms |",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
