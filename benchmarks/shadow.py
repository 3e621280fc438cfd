"""What a shadow model costs production (docs/models.md#what-a-shadow-costs): the daemon with a production model
and two cameras, without and with a shadow on every frame (sample 1.0), at 50 % and 95 % of production's
capacity through the daemon.

    python benchmarks/shadow.py --model runs/v2b0/v2b0-752x480.keras --shadow runs/v2b0/v2b0-752x480.keras

Per run: production's frames/s offered and inferred, its frames dropped (stale), its latency as a consumer sees
it (published_at - captured_at of every result event in the measured seconds: exact, not histogram buckets),
and the shadow's frames compared and skipped (busy: its queue full; yield: production frames waiting). Writes the
Markdown table to stdout (and --out FILE).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from models import SIZE, _engine, daemon_settings, time_per_frame, write_report  # noqa: E402  (benchmarks/models.py)


def _settings(model: str, shadow: str | None, fps: float):
    models: list[dict] = [{"id": "prod", "path": model}]
    if shadow is not None:
        models.append({"id": "cand", "path": shadow, "shadow_of": "prod", "sample": 1.0})
    return daemon_settings(models, {"cam1": ("prod", fps), "cam2": ("prod", fps)}, first_seed=1, results=True)


def run(model: str, shadow: str | None, fps: float, seconds: float) -> dict:
    from inspectd.client import Subscriber
    from inspectd.outputs.wire import parse_rfc3339
    from inspectd.service.daemon import Daemon

    settings = _settings(model, shadow, fps)
    daemon = Daemon(settings)
    latencies: list[float] = []
    window = threading.Event()
    done = threading.Event()

    def listen() -> None:  # every result event: published_at - captured_at, while the window is open
        with Subscriber(settings.publish.endpoint, topics=["result."]) as sub:
            while not done.is_set():
                ev = sub.recv(timeout_s=0.2)
                if ev is not None and window.is_set():
                    latencies.append(parse_rfc3339(ev.header["published_at"]) - parse_rfc3339(ev.header["captured_at"]))

    listener = threading.Thread(target=listen, daemon=True)
    try:
        daemon.startup()
        listener.start()
        time.sleep(3.0)
        m = daemon.metrics

        def counts():
            shadow_frames = sum(
                s.value
                for metric in daemon.registry.collect()
                for s in metric.samples
                if s.name == "inspectd_shadow_frames_total"
            )
            skipped = {
                s.labels["reason"]: s.value
                for metric in daemon.registry.collect()
                for s in metric.samples
                if s.name == "inspectd_shadow_skipped_total"
            }
            return (
                m.frames_captured.total(),
                m.frames_inferred.total(),
                m.frames_dropped.total(reason="stale"),
                shadow_frames,
                skipped,
                time.monotonic(),
            )

        window.set()
        c0, n0, d0, s0, k0, t0 = counts()
        time.sleep(seconds)
        c1, n1, d1, s1, k1, t1 = counts()
        window.clear()
        lat = np.array(latencies) * 1000
        out = {
            "offered_fps": (c1 - c0) / (t1 - t0),
            "inferred_fps": (n1 - n0) / (t1 - t0),
            "stale": int(d1 - d0),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "events": len(lat),
            "shadow_fps": (s1 - s0) / (t1 - t0),
            "busy": int(k1.get("busy", 0) - k0.get("busy", 0)),
            "yield": int(k1.get("yield", 0) - k0.get("yield", 0)),
        }
    finally:
        done.set()
        daemon.shutdown()
    out["residual"] = sum(abs(a.residual) for a in daemon.frame_accounts())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--shadow", default="builtin:demo")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loads", default="0.5,0.95")
    parser.add_argument("--repeat", type=int, default=2, help="each pair of runs (without, with) this many times")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from inspectd.tfload import import_tensorflow

    import_tensorflow()
    t = time_per_frame(_engine(args.model), 5.0)
    capacity = run(args.model, None, 1.0 / t, args.seconds / 2)["inferred_fps"]  # two cameras offering 2x the bare model
    print(f"capacity of production through the daemon: {capacity:.1f} frames/s", file=sys.stderr)
    lines = [
        f"# What a shadow costs production ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
        "",
        f"`python benchmarks/shadow.py --model {args.model} --shadow {args.shadow} --seconds {args.seconds:g}`, "
        f"two cameras at {SIZE[0]}x{SIZE[1]}, batch 1, runtime auto; production's capacity through the daemon "
        f"{capacity:.1f} frames/s (bare model {1000 * t:.1f} ms per frame).",
        "",
        "| load | shadow | offered frames/s | inferred frames/s | stale (dropped) | end-to-end p50 | p99 | shadow frames/s | "
        "skipped busy | skipped yield | residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in (float(x) for x in args.loads.split(",")):
        for shadow in (None, args.shadow) * args.repeat:
            r = run(args.model, shadow, load * capacity / 2, args.seconds)
            lines.append(
                f"| {100 * load:.0f} % | {'sample 1.0' if shadow else 'none'} | {r['offered_fps']:.1f} | "
                f"{r['inferred_fps']:.1f} | {r['stale']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['shadow_fps']:.1f} | "
                f"{r['busy']} | "
                f"{r['yield']} | {r['residual']} |"
            )
            print(lines[-1], file=sys.stderr)
    lines += [
        "",
        "Offered, inferred, stale and the shadow's counts over the measured seconds; end-to-end = published_at -",
        "captured_at of every result event in them (exact). Without and with the shadow alternate, to see this machine's noise.",
    ]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
