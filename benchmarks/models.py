"""Two models on one machine: one inference thread serving both in turn, or a thread each; and the daemon with
two models and four cameras at 80 % of their combined capacity (docs/models.md).

    python benchmarks/models.py --model-a builtin:demo --model-b runs/v2b0/v2b0-752x480.keras --seconds 20

1. Each model's time per frame alone (batch 1, the daemon's CPU default), in this process.
2. Threads: for `--seconds`, one thread alternating the two models' calls, then two threads calling one model
   each at the same time; frames/s per model and in all.
3. The daemon (in process, real synthetic cameras, real ZeroMQ): each model's capacity through the daemon (two
   cameras offering twice the bare model's frames/s: what it infers), then each model alone with two cameras at
   80 % of that capacity, then both with their four cameras at 80 % of the combined capacity (each model's
   cameras offering 40 % of its own capacity). Per model: frames/s inferred against frames/s offered, end-to-end p50 and
   p99 over its cameras; the frame accounts after shutdown (residual must be 0).
Writes the Markdown table to stdout (and --out FILE).
"""

from __future__ import annotations

import argparse
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspectd.bench import histogram_quantile  # noqa: E402

SIZE = (320, 240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(path: str):
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline.engine import InferenceEngine

    engine = InferenceEngine(load_model(resolve_model_path(path)), (1,), "cpu", runtime="auto")
    engine.warmup(SIZE)
    return engine


def _frames(n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8) for _ in range(n)]


def time_per_frame(engine, seconds: float) -> float:
    frames = _frames()
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        engine.infer([frames[n % len(frames)]])
        n += 1
    return (time.monotonic() - t0) / n


def one_thread(engines: dict, seconds: float) -> dict[str, float]:
    """One thread, the models in turn (the daemon's scheduling): frames/s per model."""
    frames = _frames()
    counts = dict.fromkeys(engines, 0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for name, engine in engines.items():
            engine.infer([frames[counts[name] % len(frames)]])
            counts[name] += 1
    elapsed = time.monotonic() - t0
    return {name: n / elapsed for name, n in counts.items()}


def thread_each(engines: dict, seconds: float) -> dict[str, float]:
    """A thread per model, both calling at once: frames/s per model."""
    frames = _frames()
    counts = dict.fromkeys(engines, 0)
    start = threading.Barrier(len(engines) + 1)
    stop = threading.Event()

    def loop(name, engine):
        start.wait()
        while not stop.is_set():
            engine.infer([frames[counts[name] % len(frames)]])
            counts[name] += 1

    threads = [threading.Thread(target=loop, args=item) for item in engines.items()]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {name: n / elapsed for name, n in counts.items()}


def daemon_settings(models: list[dict], cameras: dict[str, tuple[str, float]], first_seed: int = 0, results: bool = False):
    """A daemon on the CPU, batch 1, with these [[models]] tables and synthetic cameras {id: (model id, fps)}
    (seeds from `first_seed`), free ports; `results`: publish every verdict."""
    from inspectd.config import MetricsConfig, PublishConfig, Settings

    url = "synthetic://?fps={fps}&width={w}&height={h}&defect_rate=0.3&repeat=8&seed={seed}"
    return Settings(
        models=[{"device": "cpu", **m} for m in models],
        batching={"max_batch": 1},
        cameras=[
            {"id": cam, "model": mid, "url": url.format(fps=round(fps, 2), w=SIZE[0], h=SIZE[1], seed=first_seed + i)}
            for i, (cam, (mid, fps)) in enumerate(cameras.items())
        ],
        publish=PublishConfig(endpoint=f"tcp://127.0.0.1:{_free_port()}", results=results),
        metrics=MetricsConfig(port=0),
    )


def write_report(lines: list[str], out: Path | None) -> None:
    """The Markdown report on stdout, and in `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)


def _e2e(registry, cameras: list[str], q: float) -> float | None:
    """End-to-end quantile over these cameras' histograms together (buckets summed per bound)."""
    sums: dict[float, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "inspectd_end_to_end_seconds_bucket" and s.labels.get("camera") in cameras:
                le = float(s.labels["le"])
                sums[le] = sums.get(le, 0.0) + s.value
    return histogram_quantile(sorted(sums.items()), q)


def run_daemon(models: dict[str, str], cameras: dict[str, tuple[str, float]], seconds: float) -> dict:
    """Per model: offered and inferred frames/s, end-to-end p50/p99; the residual of every camera's account."""
    from inspectd.service.daemon import Daemon

    daemon = Daemon(daemon_settings([{"id": mid, "path": path} for mid, path in models.items()], cameras))
    try:
        daemon.startup()
        time.sleep(3.0)  # cameras connected, first batches through
        m = daemon.metrics
        by_model = {mid: [c for c, (cm, _) in cameras.items() if cm == mid] for mid in models}

        def inferred():
            values = m.frames_inferred.values()
            return {mid: sum(values.get((c,), 0) for c in cams) for mid, cams in by_model.items()}, time.monotonic()

        # The histograms hold the warm-up seconds too: measured again from a clean slate would need a reset, so
        # the first seconds are a small part of the run (--seconds 20 or more).
        n0, t0 = inferred()
        time.sleep(seconds)
        n1, t1 = inferred()
        out = {}
        for mid, cams in by_model.items():
            out[mid] = {
                "offered_fps": sum(cameras[c][1] for c in cams),
                "inferred_fps": (n1[mid] - n0[mid]) / (t1 - t0),
                "p50_ms": 1000 * (_e2e(daemon.registry, cams, 0.5) or float("nan")),
                "p99_ms": 1000 * (_e2e(daemon.registry, cams, 0.99) or float("nan")),
            }
    finally:
        daemon.shutdown()
    out["residual"] = sum(abs(a.residual) for a in daemon.frame_accounts())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-a", default="builtin:demo")
    parser.add_argument("--model-b", default="builtin:demo")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--load", type=float, default=0.8, help="the cameras' share of the combined capacity")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from inspectd.tfload import import_tensorflow

    import_tensorflow()
    paths = {"a": args.model_a, "b": args.model_b}
    engines = {mid: _engine(path) for mid, path in paths.items()}
    t = {mid: time_per_frame(engine, 5.0) for mid, engine in engines.items()}
    one = one_thread(engines, args.seconds)
    each = thread_each(engines, args.seconds)
    del engines
    lines = [
        f"# Two models on one machine ({platform.processor() or platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores)",
        "",
        f"`python benchmarks/models.py --model-a {args.model_a} --model-b {args.model_b} --seconds {args.seconds:g}`, "
        f"frames {SIZE[0]}x{SIZE[1]}, batch 1, runtime auto.",
        "",
        "| model | file | time per frame alone |",
        "|---|---|---|",
        *(f"| {mid} | `{paths[mid]}` | {1000 * t[mid]:.1f} ms |" for mid in paths),
        "",
        "## One inference thread or a thread per model",
        "",
        "| scheduling | a frames/s | b frames/s | total model time used |",
        "|---|---|---|---|",
        f"| one thread, models in turn | {one['a']:.1f} | {one['b']:.1f} | "
        f"{100 * (one['a'] * t['a'] + one['b'] * t['b']):.0f} % |",
        f"| a thread per model, at once | {each['a']:.1f} | {each['b']:.1f} | "
        f"{100 * (each['a'] * t['a'] + each['b'] * t['b']):.0f} % |",
        "",
        "Total model time used: frames/s x each model's time per frame alone, summed; 100 % = the machine does as",
        "much work as with one model at a time, above 100 % = running both at once gains throughput.",
        "",
        f"## The daemon: each model alone, then both, at {100 * args.load:.0f} % load",
        "",
        "| run | model | cameras | offered frames/s | inferred frames/s | inferred / offered | end-to-end p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    capacity = {}  # frames/s through the daemon, each model alone, its two cameras offering twice the bare model
    for mid in paths:
        res = run_daemon({mid: paths[mid]}, {f"{mid}{i}": (mid, 1.0 / t[mid]) for i in (1, 2)}, args.seconds / 2)
        capacity[mid] = res[mid]["inferred_fps"]
        print(f"capacity of {mid} through the daemon: {capacity[mid]:.1f} frames/s", file=sys.stderr)
    runs = {}
    for mid in paths:  # alone: two cameras at `load` of this model's capacity
        fps = args.load * capacity[mid] / 2
        runs[f"{mid} alone"] = ({mid: paths[mid]}, {f"{mid}{i}": (mid, fps) for i in (1, 2)})
    # both: each model's two cameras offer load/2 of its own capacity
    runs["both"] = (paths, {f"{mid}{i}": (mid, args.load / 2 * capacity[mid] / 2) for mid in paths for i in (1, 2)})
    lines[-4:-4] = [
        "Capacity through the daemon (each model alone, two cameras offering twice the bare model's frames/s): "
        + ", ".join(f"{mid} {capacity[mid]:.1f} frames/s" for mid in paths)
        + ". Each run's load is a share of that.",
        "",
    ]
    residuals = {}
    for name, (models, cameras) in runs.items():
        res = run_daemon(models, cameras, args.seconds)
        residuals[name] = res.pop("residual")
        for mid, r in res.items():
            lines.append(
                f"| {name} | {mid} | {sum(c[0] == mid for c in cameras.values())} | {r['offered_fps']:.1f} | "
                f"{r['inferred_fps']:.1f} | {100 * r['inferred_fps'] / r['offered_fps']:.0f} % | {r['p50_ms']:.0f} ms | "
                f"{r['p99_ms']:.0f} ms |"
            )
        print(lines[-1], file=sys.stderr)
    lines += [
        "",
        "Frame accounts after each run (captured = inferred + dropped + in flight): residual "
        + ", ".join(f"{name} {r}" for name, r in residuals.items())
        + ".",
        "End-to-end quantiles are read from the daemon's histogram buckets (an upper bound, as Prometheus' histogram_quantile).",
    ]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
