"""OpenCV (FFmpeg) against GStreamer for rtsp:// cameras, side by side, on the faults that matter on a line.

    .venv/bin/python benchmarks/rtsp_backends.py [--repeats 3] [--json benchmarks/results/rtsp_backends.json]

For each backend, with the test suite's RTSP server (tests/rtsp.py: GStreamer's RTSP server, x264,
RTP over TCP) behind the test suite's loopback TCP proxy (tests/tcp_proxy.py), and a CameraWorker
with open/stall timeouts of 1 s and reconnects between 0.2 and 1 s:
- whole frames: 100 frames of a stream with 1 and 4 H.264 slices per frame, and with x264's sliced
  threads (3 slices here); a frame with a band that does not match the frame sent (a slice of
  another frame, or one the decoder made up) is torn (tests/rtsp.py counter_match);
- resolution change: the camera goes from 320x240 to 256x192 mid-stream; what size the frames
  arrive at, and whether their content is the new picture or the new picture stretched;
- half-open cut, media stall with the RTSP session up, 40 corrupt RTP packets: seconds from the
  fault until frames flow again;
- a camera that accepts the connection and answers nothing: seconds from when it starts
  answering until its first frame.
This is how `backend = "auto"` was chosen for RTSP (docs/cameras.md); it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the test suite's RTSP server and proxy

from prometheus_client import CollectorRegistry  # noqa: E402
from rtsp import RtspServer, counter_match, read_frames, synthetic_frame  # noqa: E402
from support import wait_until  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

from inspectd.config import CameraConfig  # noqa: E402
from inspectd.frames import CameraState  # noqa: E402
from inspectd.metrics import Metrics  # noqa: E402
from inspectd.sources import CameraWorker, open_source  # noqa: E402

BACKENDS = ("opencv", "gstreamer")
TIMING = dict(open_timeout_s=1, stall_timeout_s=1, reconnect_initial_s=0.2, reconnect_max_s=1)
W, H, ALT, FPS = 320, 240, (256, 192), 10


def torn_frames(backend: str, slices: int) -> tuple[str, int]:
    """('torn / received', slices per frame as sent) for 100 frames of a counter stream."""
    with (
        RtspServer(mode="counter", width=W, height=H, fps=25, slices=slices, tcp_only=True) as server,
        TcpProxy(server.port) as proxy,
    ):
        frames = read_frames(open_source(CameraConfig(id="b", url=proxy.url(), backend=backend, **TIMING)), 100, 30)
        sent = statistics.median(proxy.slices_per_frame())
    torn = sum(max(counter_match(frame)[1]) >= 10 for frame in frames)
    return f"{torn} / {len(frames)}", int(sent)


def resolution_change(backend: str) -> str:
    """Frame sizes after the switch, and the content's error against the new picture vs the stretched one."""
    with RtspServer(mode="synthetic", width=W, height=H, fps=FPS, alt_size=ALT) as server:
        src = open_source(CameraConfig(id="b", url=server.url, backend=backend, **TIMING))
        src.open()
        try:
            t0, frames, switched = time.monotonic(), [], False
            while time.monotonic() - t0 < 6:
                if not switched and time.monotonic() - t0 > 2:
                    server.switch_size()
                    switched, frames = True, []
                if (image := src.read(0.2)) is not None:
                    frames.append(image)
        finally:
            src.close()
    last = frames[-1].astype(np.float32).mean(axis=2)
    new = synthetic_frame(0, *ALT).image
    sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames[-10:]})
    if last.shape == new.shape:
        return f"{', '.join(sizes)} (new picture, error {np.abs(last - new).mean():.1f})"
    stretched = cv2.resize(new, (last.shape[1], last.shape[0])).astype(np.float32)
    return f"{', '.join(sizes)} (the new picture stretched, error {np.abs(last - stretched).mean():.1f})"


class Camera:
    def __init__(self, url: str, backend: str):
        self.frames: list[float] = []  # arrival times
        self.worker = CameraWorker(
            CameraConfig(id="b", url=url, backend=backend, **TIMING),
            lambda f: self.frames.append(time.monotonic()),
            Metrics(CollectorRegistry()),
        )
        self.worker.start()

    def flowing_since(self, t0: float, quiet: float = 0.5) -> float | None:
        """The end of the last gap of `quiet` s or more in the frames after t0 (t0 if none), once frames
        have flowed for 2 s since; None before that."""
        times = [t0] + [t for t in self.frames if t >= t0]
        end = t0
        for a, b in zip(times, times[1:]):
            if b - a >= quiet:
                end = b
        return end if times[-1] - end >= 2 else None

    def close(self) -> None:
        self.worker.stop()
        self.worker.join(5)


def faults(backend: str, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "half-open cut": [],
        "media stall, session up": [],
        "40 corrupt RTP packets": [],
        "never answers, then answers": [],
    }
    with RtspServer(mode="synthetic", width=W, height=H, fps=FPS, tcp_only=True) as server, TcpProxy(server.port) as proxy:
        cam = Camera(proxy.url(), backend)
        try:
            for _ in range(repeats):
                for name, inject in (
                    ("half-open cut", proxy.cut),
                    ("media stall, session up", proxy.stall),
                    ("40 corrupt RTP packets", lambda: proxy.corrupt(40)),
                ):
                    wait_until(lambda: cam.worker.state is CameraState.UP and cam.flowing_since(time.monotonic() - 3), 30)
                    t0 = time.monotonic()
                    inject()
                    wait_until(lambda t0=t0: cam.flowing_since(t0) is not None, 30)
                    out[name].append(cam.flowing_since(t0) - t0)
                proxy.blackhole(True)
                proxy.cut()
                wait_until(lambda: cam.worker.state is CameraState.DOWN, 30)
                time.sleep(3)  # a few unanswered attempts
                t0 = time.monotonic()
                proxy.blackhole(False)
                wait_until(lambda t0=t0: any(t > t0 for t in cam.frames), 30)
                out["never answers, then answers"].append(next(t for t in cam.frames if t > t0) - t0)
        finally:
            cam.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="times each fault is played (default 3)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results: dict[str, dict[str, str]] = {}
    for backend in BACKENDS:
        row = results.setdefault(backend, {})
        for slices, what in ((1, "1 slice/frame"), (4, "4 slices/frame"), (0, "x264 sliced threads")):
            torn, sent = torn_frames(backend, slices)
            row[f"torn frames, {what} ({sent} sent)"] = torn
            print(f"{backend}: torn frames, {what} ({sent} slices per frame sent): {torn}", flush=True)
        row["after 320x240 -> 256x192"] = resolution_change(backend)
        print(f"{backend}: resolution change: {row['after 320x240 -> 256x192']}", flush=True)
        for name, times in faults(backend, args.repeats).items():
            row[f"{name}: frames again after (s)"] = (
                f"median {statistics.median(times):.2f}, max {max(times):.2f} (n={len(times)})"
            )
            print(f"{backend}: {name}: {row[f'{name}: frames again after (s)']}", flush=True)
    print("\n| | " + " | ".join(BACKENDS) + " |\n|---|" + "---|" * len(BACKENDS))
    for key in results[BACKENDS[0]]:
        print(f"| {key} | " + " | ".join(results[b][key] for b in BACKENDS) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
