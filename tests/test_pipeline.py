"""The pipeline with real parts: frame accounting in a running daemon, context swaps between batches."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
from conftest import run_cli
from prometheus_client import CollectorRegistry
from support import wait_until

from inspectd.config import BatchingConfig, CameraConfig, MetricsConfig, PublishConfig, Settings
from inspectd.frames import DropReason, Frame
from inspectd.metrics import Metrics, frame_accounts
from inspectd.pipeline.context import InferenceContext
from inspectd.pipeline.core import Pipeline
from inspectd.pipeline.engine import InferenceEngine
from inspectd.pipeline.postprocess import InspectOptions

pytestmark = pytest.mark.slow


def test_every_frame_accounted_for_5_cameras_batch_2(tf):
    """A real daemon (synthetic cameras at uneven rates, max_batch 2): after shutdown, for every camera,
    captured = inferred + dropped by reason, nothing in flight, residual 0."""
    from inspectd.service.daemon import Daemon

    rates = {"a": 60, "b": 35, "c": 20, "d": 8, "e": 3}
    cams = [
        CameraConfig(
            id=cam, url=f"synthetic://?fps={fps}&width=96&height=64&defect_rate=0.3&seed={i}", fps_limit=25 if cam == "a" else 0
        )
        for i, (cam, fps) in enumerate(rates.items())
    ]
    settings = Settings(
        batching=BatchingConfig(max_batch=2, max_wait_ms=5),
        cameras=cams,
        publish=PublishConfig(endpoint="tcp://127.0.0.1:0"),
        metrics=MetricsConfig(port=0),
    )
    daemon = Daemon(settings)
    try:
        daemon.startup()

        def inferred(cam: str) -> float:
            return daemon.registry.get_sample_value("inspectd_frames_inferred_total", {"camera": cam}) or 0.0

        wait_until(lambda: all(inferred(c) >= 5 for c in rates), 120, "5 inferred frames from every camera")
    finally:
        daemon.shutdown()
    accounts = {a.camera: a for a in daemon.frame_accounts()}
    assert set(accounts) == set(rates)
    for account in accounts.values():
        assert account.in_flight == 0, account
        assert account.residual == 0, str(account)
        assert account.captured == account.inferred + sum(account.dropped.values())
    assert accounts["a"].dropped.get(DropReason.FPS_LIMIT.value, 0) > 0  # the 25 fps limit on a 60 fps camera


class _Sink:
    """Records what the pipeline hands to the publisher."""

    def __init__(self):
        self.items: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def publish_inspection(self, insp, model, results=False, defect_event=True):
        with self.lock:
            self.items.append((insp.threshold, model["name"]))

    def publish_episode(self, episode, model, best_event):
        pass


def test_swap_never_mixes_contexts(tf):
    """Two contexts (engines with different batch limits, different thresholds and model names) swapped
    back and forth while frames flow: every inspection carries the threshold of the model that made it,
    and no batch ever reaches an engine too small for it (that would be a drop with reason `error`)."""
    from inspectd.model.deployable import load_model, resolve_model_path

    demo = load_model(resolve_model_path("builtin:demo"))
    contexts = []
    for name, buckets, threshold in (("small", (1,), 0.11), ("large", (1, 2, 4), 0.99)):
        deployable = dataclasses.replace(demo, meta={**demo.meta, "name": name})
        engine = InferenceEngine(deployable, buckets)
        engine.warmup()
        contexts.append(InferenceContext.single(engine, InspectOptions(threshold=threshold), deployable, max_wait_s=0.002))
    expected = {"small": 0.11, "large": 0.99}
    registry = CollectorRegistry()
    sink = _Sink()
    pipeline = Pipeline(contexts[0], Metrics(registry), sink, workers=2)
    pipeline.start()
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    seq = 0
    try:
        for swap in range(40):
            pipeline.swap(contexts[swap % 2])
            for cam in ("a", "b", "c", "d"):
                seq += 1
                pipeline.put(Frame(cam, seq, time.time(), time.monotonic(), image))
            time.sleep(0.01)  # lets batches form between swaps (pacing, not a timing assertion)
    finally:
        pipeline.stop(timeout=30)
    assert {name for _, name in sink.items} == {"small", "large"}
    assert all(threshold == expected[name] for threshold, name in sink.items)
    accounts = frame_accounts(registry, pipeline.in_flight())
    assert all(a.dropped.get(DropReason.ERROR.value, 0) == 0 for a in accounts), [str(a) for a in accounts]
    inferred = sum(a.inferred for a in accounts)
    dropped = sum(sum(a.dropped.values()) for a in accounts)
    assert inferred == len(sink.items) and inferred + dropped == seq


def test_bench_prints_balanced_accounts():
    """`inspectd bench` with more cameras than the batch: every camera's account printed, residual 0, exit 0."""
    r = run_cli("bench", "--batch", "2", "--cameras", "5", "--seconds", "2", "--size", "96x64", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    pipe = json.loads(r.stdout.strip().splitlines()[-1])["pipeline"]
    assert pipe["residual"] == 0
    assert len(pipe["accounts"]) == 5 and all(line.endswith("in flight 0; residual 0") for line in pipe["accounts"])


def test_histogram_quantile_interpolates_as_prometheus():
    """Cases worked by hand from Prometheus' documented rule (linear within the bucket; the second-highest
    bound when the quantile falls into +Inf; NaN, here None, without +Inf or observations). The same function
    is compared with a real Prometheus in test_prometheus.py."""
    from inspectd.bench import histogram_quantile

    inf = float("inf")
    buckets = [(0.1, 10), (0.5, 30), (inf, 40)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram_quantile(buckets, 0.1) == pytest.approx(0.04)  # rank 4 in [0, 0.1]
    assert histogram_quantile(buckets, 0.99) == 0.5  # in +Inf: the highest finite bound
    # Label sets are summed per bound: two cameras' halves give the same answer as the whole.
    halves = [(le, n / 2) for le, n in buckets] * 2
    assert histogram_quantile(halves, 0.5) == pytest.approx(0.3)
    assert histogram_quantile([], 0.5) is None
    assert histogram_quantile([(0.1, 0), (inf, 0)], 0.5) is None
    assert histogram_quantile([(0.1, 5), (0.5, 7)], 0.5) is None  # no +Inf bucket
