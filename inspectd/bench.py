"""`inspectd bench`: frames/s of the bare model and of the full pipeline, at the same batch size, in one run.

The bare model: `InferenceEngine.infer` in a loop on frames already in memory (the ceiling).
The full pipeline: a real in-process Daemon with synthetic cameras offering together 1.2x what the
bare model managed (unless --camera-fps is given), so the model is never idle and the cameras do
not take more of the machine than a line that outruns its PC by 20 %: capture -> slots -> batcher
-> inference -> post-processing -> ZeroMQ. Both use the same runtime (`auto` by default).
The ratio of the two is the pipeline's overhead; absolute numbers move with machine load, so
compare within one run.
"""

from __future__ import annotations

__all__ = ["BenchOptions", "bench", "format_bench"]

import math
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchOptions:
    model: str = "builtin:demo"
    batch: int = 1
    cameras: int = 2
    camera_fps: float | None = None  # None: together OFFERED x the bare model's frames/s
    width: int = 320
    height: int = 240
    seconds: float = 20.0
    device: str = "auto"
    runtime: str = "auto"
    precision: str = "float32"
    cache_dir: Path | None = None


OFFERED = 1.2  # the cameras' frames/s over the bare model's, by default: just above its capacity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_model(opts: BenchOptions) -> dict:
    """Frames/s of the engine alone, full batches of `opts.batch` frames, after warm-up."""
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline import autotune
    from inspectd.pipeline.engine import InferenceEngine

    # With runtime auto the engine measures the candidates at this batch size (or reads the cache); the daemon
    # below, at the same max_batch, reads the same measurement, so both run the same choice.
    engine = InferenceEngine(
        load_model(resolve_model_path(opts.model)),
        (opts.batch,),
        opts.device,
        precision=opts.precision,
        runtime=opts.runtime,
        cache_dir=opts.cache_dir,
    )
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (opts.height, opts.width, 3), dtype=np.uint8) for _ in range(opts.batch)]
    engine.warmup((opts.width, opts.height))
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < opts.seconds:
        engine.infer(frames)
        n += opts.batch
    elapsed = time.monotonic() - t0
    return {
        "frames": n,
        "seconds": round(elapsed, 2),
        "fps": round(n / elapsed, 2),
        "device": engine.device,
        "runtime": engine.runtime,
        "hint": engine.hint if engine.runtime == "openvino" else None,
        "precision": engine.precision,
        "auto": None if engine.choice is None else autotune.format_table(engine.choice),
    }


def _settings(opts: BenchOptions):
    from inspectd.config import BatchingConfig, CameraConfig, MetricsConfig, ModelConfig, PublishConfig, Settings

    # repeat: each camera cycles through 8 frames rendered once. Rendering a new 320x240 frame costs about 5 ms
    # (more than the demo model's inference with onnxruntime), which would measure the renderer, not the pipeline.
    url = f"synthetic://?fps={opts.camera_fps}&width={opts.width}&height={opts.height}&defect_rate=0.3&repeat=8&seed="
    cams = [CameraConfig(id=f"bench{i}", url=url + str(i)) for i in range(opts.cameras)]
    return Settings(
        model=ModelConfig(
            path=opts.model,
            device=opts.device,
            runtime=opts.runtime,
            precision=opts.precision,
            cache_dir=str(opts.cache_dir) if opts.cache_dir else "",
        ),
        batching=BatchingConfig(max_batch=opts.batch, max_wait_ms=10),
        cameras=cams,
        publish=PublishConfig(endpoint=f"tcp://127.0.0.1:{_free_port()}"),
        metrics=MetricsConfig(port=0),
    )


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs (label sets summed per bound):
    linear within the bucket that holds quantile q; the last finite bound if q falls in +Inf.
    Written here because prometheus-client only collects; the benchmarks use it on scraped text too."""
    counts: dict[float, float] = {}
    for le, count in buckets:
        counts[le] = counts.get(le, 0.0) + count
    bounds = sorted(counts)
    if len(bounds) < 2 or not math.isinf(bounds[-1]) or counts[bounds[-1]] == 0:
        return None  # Prometheus: NaN without a +Inf bucket or with fewer than two buckets, or no observations
    rank, lower, below = q * counts[bounds[-1]], 0.0, 0.0
    for b in bounds:
        if counts[b] >= rank:
            if math.isinf(b):
                return lower
            return round(lower + (b - lower) * (rank - below) / max(counts[b] - below, 1e-12), 4)
        lower, below = b, counts[b]
    return None


def _quantile(registry, name: str, q: float, labels: dict | None = None) -> float | None:
    return histogram_quantile(
        [
            (float(s.labels["le"]), s.value)
            for metric in registry.collect()
            for s in metric.samples
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in (labels or {}).items())
        ],
        q,
    )


def full_pipeline(opts: BenchOptions) -> dict:
    """Frames/s through the real daemon, measured over `opts.seconds` after it reported ready.

    After the daemon has stopped, every camera's frame account must balance: captured = inferred +
    dropped (by reason), nothing in flight, residual 0."""
    from inspectd.service.daemon import Daemon

    daemon = Daemon(_settings(opts))
    try:
        daemon.startup()
        time.sleep(2.0)  # cameras connected, first batches through
        reg, m = daemon.registry, daemon.metrics

        def counts():
            return m.frames_captured.total(), m.frames_inferred.total(), time.monotonic()

        c0, n0, t0 = counts()
        time.sleep(opts.seconds)
        c1, n1, t1 = counts()
        result = {
            "frames": int(n1 - n0),
            "seconds": round(t1 - t0, 2),
            "fps": round((n1 - n0) / (t1 - t0), 2),
            "captured_fps": round((c1 - c0) / (t1 - t0), 2),
            "stale_dropped": int(m.frames_dropped.total(reason="stale")),
            "end_to_end_p50_s": _quantile(reg, "inspectd_end_to_end_seconds", 0.5),
            "end_to_end_p99_s": _quantile(reg, "inspectd_end_to_end_seconds", 0.99),
            "inference_p50_s": _quantile(reg, "inspectd_inference_seconds", 0.5),
        }
    finally:
        daemon.shutdown()
    accounts = daemon.frame_accounts()
    result["accounts"] = [str(a) for a in accounts]
    result["residual"] = sum(abs(a.residual) for a in accounts)  # +1 on one camera must not hide -1 on another
    return result


def bench(opts: BenchOptions) -> dict:
    bare = bare_model(opts)  # a .keras model imports TensorFlow as it loads; an exported one needs none
    if opts.camera_fps is None:
        opts = replace(opts, camera_fps=round(OFFERED * bare["fps"] / opts.cameras, 1))
    options = {**opts.__dict__, "cache_dir": str(opts.cache_dir) if opts.cache_dir else None}  # JSON-ready
    return {"options": options, "bare_model": bare, "pipeline": full_pipeline(opts)}


def format_bench(res: dict) -> str:
    o, bare, pipe = res["options"], res["bare_model"], res["pipeline"]
    ratio = pipe["fps"] / bare["fps"] if bare["fps"] else float("nan")
    hint = f" ({bare['hint'].lower()})" if bare.get("hint") else ""
    return "\n".join(
        [
            *([bare["auto"]] if bare.get("auto") else []),
            f"model {o['model']}  batch {o['batch']}  {o['cameras']} synthetic cameras at {o['camera_fps']} fps, "
            f"{o['width']}x{o['height']}  device {bare['device']}  runtime {bare['runtime']}{hint}  "
            f"precision {bare['precision']}",
            f"bare model     {bare['fps']:8.2f} frames/s  ({bare['frames']} frames in {bare['seconds']} s)",
            f"full pipeline  {pipe['fps']:8.2f} frames/s  ({pipe['frames']} frames in {pipe['seconds']} s) = "
            f"{100 * ratio:.0f} % of the bare model",
            f"pipeline: captured {pipe['captured_fps']} frames/s, {pipe['stale_dropped']} stale frames dropped, "
            f"end-to-end p50 <= {pipe['end_to_end_p50_s']} s, p99 <= {pipe['end_to_end_p99_s']} s, "
            f"inference p50 <= {pipe['inference_p50_s']} s per batch",
            "frame accounting after shutdown (captured = inferred + dropped + in flight):",
            *(f"  {line}" for line in pipe["accounts"]),
            f"  residual {pipe['residual']} ({'every frame accounted for' if pipe['residual'] == 0 else 'FRAMES LOST'})",
        ]
    )
