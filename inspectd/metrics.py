"""Every Prometheus metric of the daemon, on a registry passed in (the HTTP server is `inspectd.service.metrics`).

>>> m = Metrics(CollectorRegistry())
>>> m.frames_captured.labels(camera="line1-top").inc()
>>> m.frames_captured.total(camera="line1-top")
1.0
Nothing is registered at import time; tests use a private registry each. State first: the counts
the daemon itself reads (frames per camera, reconnects) are `Tally` objects, plain state that
Prometheus exports at each scrape; nothing reads the registry back.
"""

from __future__ import annotations

__all__ = ["Metrics", "Tally", "TallyExport", "FrameAccount", "accounts", "frame_accounts", "BATCH_BUCKETS", "LATENCY_BUCKETS"]

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from inspectd import __version__

NS = "inspectd"
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Inference on CPU takes 0.05-1 s per batch; on a GPU a few ms: buckets cover both.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99)


class Tally:
    """A labelled count kept as plain state, exported to Prometheus as a counter (`TallyExport`).

    The API of a prometheus_client Counter where the pipeline uses one (`labels(...).inc(n)`), plus
    reads for the daemon (`total`, `values`). Written by hand because client_python's Counter keeps
    its values private and documents `get_sample_value` as meant for unit tests.

    >>> t = Tally("frames_dropped", "Frames not inferred", ("camera", "reason"))
    >>> t.labels(camera="a", reason="stale").inc(2)
    >>> t.total(reason="stale")
    2.0
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str]):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {}

    def labels(self, **labels: str) -> _TallyChild:
        """The series of these label values, at 0 from now on (as a Counter's child), to `inc()`."""
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)}, expected {list(self.labelnames)}")
        key = tuple(str(labels[name]) for name in self.labelnames)
        with self._lock:
            self._values.setdefault(key, 0.0)
        return _TallyChild(self, key)

    def _inc(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a count only grows (inc by {amount})")
        with self._lock:
            self._values[key] += amount

    def values(self) -> dict[tuple[str, ...], float]:
        """A copy of every series: {label values: count}."""
        with self._lock:
            return dict(self._values)

    def total(self, **match: str) -> float:
        """The sum of the series whose labels match (all of them without arguments)."""
        index = {name: i for i, name in enumerate(self.labelnames)}
        return sum(v for k, v in self.values().items() if all(k[index[n]] == str(x) for n, x in match.items()))


class _TallyChild:
    __slots__ = ("_tally", "_key")

    def __init__(self, tally: Tally, key: tuple[str, ...]):
        self._tally, self._key = tally, key

    def inc(self, amount: float = 1) -> None:
        self._tally._inc(self._key, amount)


class TallyExport:
    """The Prometheus collector of some `Tally`s: one counter family each, read at every scrape."""

    def __init__(self, namespace: str, tallies: Iterable[Tally]):
        self._namespace, self._tallies = namespace, tuple(tallies)

    def _family(self, tally: Tally) -> CounterMetricFamily:
        return CounterMetricFamily(f"{self._namespace}_{tally.name}", tally.documentation, labels=tally.labelnames)

    def describe(self):
        return [self._family(t) for t in self._tallies]

    def collect(self):
        for tally in self._tallies:
            family = self._family(tally)
            for key, value in sorted(tally.values().items()):
                family.add_metric(list(key), value)
            yield family


class Metrics:
    """The daemon's metrics (names are a contract: Grafana and the alert rules use them)."""

    def __init__(self, registry: CollectorRegistry):
        # No `_created` series: one more per labelled counter/histogram, of no use to the alert rules or
        # dashboards (rate() needs none). prometheus_client's switch is process-wide.
        disable_created_metrics()
        self.registry = registry
        r: dict[str, Any] = {"registry": registry, "namespace": NS}
        # The counts the daemon reads itself (fps, the live view, frame accounts): state, exported at each scrape.
        self.frames_captured = Tally("frames_captured", "Frames read from the camera", ["camera"])
        self.frames_dropped = Tally(
            "frames_dropped",
            "Frames not inferred, by reason (stale: replaced by a newer frame before inference; fps_limit; decode)",
            ["camera", "reason"],
        )
        self.frames_inferred = Tally("frames_inferred", "Frames run through the model", ["camera"])
        self.defects = Tally("defects", "Frames judged defective (score >= threshold)", ["camera"])
        self.episodes = Counter(
            "episodes",
            "Defect episodes ended, by how they ended (frames, time, shutdown, camera_stopped)",
            ["camera", "end"],
            **r,
        )
        self.parts = Tally(
            "parts", "Parts (part mode) given their one verdict, by verdict (defect, ok, not_inspected)", ["camera", "verdict"]
        )
        self.parts_not_inspected = Tally(
            "parts_not_inspected",
            "Parts without the model's verdict by their deadline, by reason "
            "(deadline, late, queue_full, decode, roi, error, shutdown)",
            ["camera", "reason"],
        )
        self.camera_up = Gauge("camera_up", "1 while the camera delivers frames, else 0", ["camera"], **r)
        self.camera_reconnects = Tally("camera_reconnects", "Reconnection attempts", ["camera"])
        registry.register(
            TallyExport(
                NS,
                (
                    self.frames_captured,
                    self.frames_dropped,
                    self.frames_inferred,
                    self.defects,
                    self.camera_reconnects,
                    self.parts,
                    self.parts_not_inspected,
                ),
            )
        )
        self.batch_size = Histogram(
            "batch_size", "Real (unpadded) frames per inference batch, per model", ["model"], buckets=BATCH_BUCKETS, **r
        )
        self.inference_seconds = Histogram(
            "inference_seconds", "Model call per batch (preprocess + forward), per model", ["model"], buckets=LATENCY_BUCKETS, **r
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds", "Capture to publish, per frame", ["camera"], buckets=LATENCY_BUCKETS, **r
        )
        self.part_latency_seconds = Histogram(
            "part_latency_seconds", "Part mode: capture to verdict, per part", ["camera"], buckets=LATENCY_BUCKETS, **r
        )
        self.score = Histogram("score", "Defect score per inferred frame", ["camera"], buckets=SCORE_BUCKETS, **r)
        self.events_published = Counter("events_published", "ZeroMQ messages sent", ["topic"], **r)
        self.events_dropped = Counter("events_dropped", "ZeroMQ messages dropped (send queue full)", ["topic"], **r)
        self.archive_written = Counter(
            "archive_written", "Entries written to the archive (defect events, sampled ok frames)", **r
        )
        self.archive_dropped = Counter(
            "archive_dropped",
            "Archive entries lost, by reason (queue_full: the disk is "
            "slower than the defects; disk_full; read_only; permission; error)",
            ["reason"],
            **r,
        )
        self.archive_errors = Counter("archive_errors", "Archive writes that failed (every reason but queue_full)", **r)
        self.archive_bytes = Gauge("archive_bytes", "Bytes in the archive's entries", **r)
        self.archive_entries = Gauge("archive_entries", "Entries in the archive", **r)
        self.replay_requests = Counter(
            "replay_requests",
            "Replay requests answered, by how the answer ended (complete, partial, unknown_run, error)",
            ["status"],
            **r,
        )
        self.triggers = Counter(
            "triggers",
            "Trigger requests answered (part mode): accepted, refused (no such camera, not in part mode, busy), "
            "error (malformed)",
            ["status"],
            **r,
        )
        self.replay_abandoned = Counter(
            "replay_abandoned", "Replay answers abandoned: the consumer stopped reading or went away", **r
        )
        self.handshakes_refused = Counter(
            "handshakes_refused",
            "ZeroMQ connections refused at the CURVE handshake, "
            "by socket (events, replay) and reason (auth: a client key not allowed; "
            "protocol: plain text or the wrong server key; other)",
            ["socket", "reason"],
            **r,
        )
        self.reload_failures = Counter("reload_failures", "Reloads (SIGHUP) rejected; the old config/model kept", **r)
        self.model_info = Gauge(
            "model_info",
            "The loaded models (value 1 each; model = its id in the config, shadow_of = the model a shadow follows, "
            "else empty), the runtime running each at which precision and largest batch, and with runtime auto what was "
            "measured (auto: the candidates' frames/s, fastest first)",
            ["model", "shadow_of", "name", "sha256", "backbone", "input", "runtime", "precision", "max_batch", "device", "auto"],
            **r,
        )
        shadow = ["model", "shadow"]  # a shadow model (docs/models.md#a-shadow-model): the model it follows, its id
        self.shadow_frames = Counter(
            "shadow_frames",
            "Frames a shadow model also ran, by the two verdicts (production, shadow_verdict: defect or ok)",
            [*shadow, "production", "shadow_verdict"],
            **r,
        )
        self.shadow_skipped = Counter(
            "shadow_skipped",
            "Frames sampled for a shadow model it did not run: busy (its queue full), yield (production frames waiting)",
            [*shadow, "reason"],
            **r,
        )
        self.shadow_region_iou = Histogram(
            "shadow_region_iou",
            "IoU of the production and shadow models' regions, on frames both call defective",
            shadow,
            buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
            **r,
        )
        self.shadow_agreement = Gauge(
            "shadow_agreement", "Share of the frames compared on which both verdicts agree (since the model files)", shadow, **r
        )
        self.shadow_score_correlation = Gauge(
            "shadow_score_correlation", "Pearson correlation of the two models' scores (since the model files)", shadow, **r
        )
        self.camera_info = Gauge(
            "camera_info",
            "The cameras (value 1 each): the model (id) their frames go to, and their mode",
            ["camera", "model", "mode"],
            **r,
        )
        self.build = Info("build", "inspectd build", **r)
        self.build.info({"version": __version__})
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def refused(self, socket_name: str, reasons: Iterable[str]) -> Callable[[str], None]:
        """The `refused(reason)` hook of a CURVE server socket: its series (one per reason it can give) start
        at 0, so that `increase()` sees the first refusal."""
        for reason in reasons:
            self.handshakes_refused.labels(socket=socket_name, reason=reason)
        return lambda reason: self.handshakes_refused.labels(socket=socket_name, reason=reason).inc()

    def watch_archive(self, archive, reasons: Iterable[str]) -> None:
        """Export an `inspectd.outputs.archive.Archive`: its size read at each scrape, every drop reason it can
        give from 0 (so that `increase()` sees the first loss)."""
        for reason in reasons:
            self.archive_dropped.labels(reason=reason)
        self.archive_bytes.set_function(lambda: archive.index.total_bytes)
        self.archive_entries.set_function(lambda: len(archive.index))

    def archive_drop(self, reason: str) -> None:
        self.archive_dropped.labels(reason=reason).inc()
        if reason != "queue_full":
            self.archive_errors.inc()

    def set_models(self, runs: Iterable, shadow_of: Mapping[str, str] | None = None) -> None:
        """Export the loaded models (`inspectd.pipeline.context.ModelRun`s), each with its runtime and device, as the
        only `model_info` series; `shadow_of`: {shadow id: the model it follows}."""
        shadow_of = shadow_of or {}
        self.model_info.clear()
        for run in runs:
            d, engine = run.deployable, run.engine
            w, h = d.input_size
            self.model_info.labels(
                model=run.id,
                shadow_of=shadow_of.get(run.id, ""),
                name=d.name,
                sha256=d.sha256,
                backbone=d.meta.get("backbone", "unknown"),
                input=f"{w}x{h}",
                runtime=engine.runtime,
                precision=engine.precision,
                max_batch=str(engine.buckets[-1]),
                device=engine.device,
                auto=engine.choice.summary() if engine.choice is not None else "",
            ).set(1)
            self.inference_seconds.labels(model=run.id)  # every model's series from the start
            self.batch_size.labels(model=run.id)

    def set_cameras(self, cameras: Mapping[str, tuple[str, str]]) -> None:
        """Export {camera: (model id, mode)} as the only `camera_info` series."""
        self.camera_info.clear()
        for camera, (model, mode) in cameras.items():
            self.camera_info.labels(camera=camera, model=model, mode=mode).set(1)


@dataclass(frozen=True)
class FrameAccount:
    """One camera's frames: captured = inferred + dropped (by reason) + in flight, or `residual` is not 0."""

    camera: str
    captured: int = 0
    inferred: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    in_flight: int = 0

    @property
    def residual(self) -> int:
        """Frames that are none of inferred, dropped or in flight: lost without a trace (must be 0)."""
        return self.captured - self.inferred - sum(self.dropped.values()) - self.in_flight

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()) if v) or "none"
        return (
            f"{self.camera}: captured {self.captured} = inferred {self.inferred} + dropped "
            f"{sum(self.dropped.values())} ({reasons}) + in flight {self.in_flight}; residual {self.residual}"
        )


def _accounts(
    captured: Mapping[str, int],
    inferred: Mapping[str, int],
    dropped: Mapping[str, dict[str, int]],
    in_flight: Mapping[str, int] | None,
) -> list[FrameAccount]:
    in_flight = in_flight or {}
    cameras = sorted(set(captured) | set(inferred) | set(dropped) | set(in_flight))
    return [FrameAccount(c, captured.get(c, 0), inferred.get(c, 0), dropped.get(c, {}), in_flight.get(c, 0)) for c in cameras]


def accounts(metrics: Metrics, in_flight: Mapping[str, int] | None = None) -> list[FrameAccount]:
    """Every camera's frame account, from the daemon's counts (plus frames still in flight)."""
    dropped: dict[str, dict[str, int]] = defaultdict(dict)
    for (cam, reason), value in metrics.frames_dropped.values().items():
        dropped[cam][reason] = int(value)
    return _accounts(
        {k[0]: int(v) for k, v in metrics.frames_captured.values().items()},
        {k[0]: int(v) for k, v in metrics.frames_inferred.values().items()},
        dropped,
        in_flight,
    )


def frame_accounts(registry: CollectorRegistry, in_flight: Mapping[str, int] | None = None) -> list[FrameAccount]:
    """Every camera's frame account as a scraper sees it: from the samples `registry` exports (tests check the
    export with it; the daemon uses `accounts`)."""
    captured: dict[str, int] = defaultdict(int)
    inferred: dict[str, int] = defaultdict(int)
    dropped: dict[str, dict[str, int]] = defaultdict(dict)
    for metric in registry.collect():
        for s in metric.samples:
            # These three counters are declared with a `camera` label: every sample has one.
            if s.name == f"{NS}_frames_captured_total":
                captured[s.labels["camera"]] += int(s.value)
            elif s.name == f"{NS}_frames_inferred_total":
                inferred[s.labels["camera"]] += int(s.value)
            elif s.name == f"{NS}_frames_dropped_total":
                dropped[s.labels["camera"]][s.labels["reason"]] = int(s.value)
    return _accounts(captured, inferred, dropped, in_flight)
