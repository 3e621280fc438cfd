"""Every Prometheus metric of the daemon, on a registry passed in (the HTTP server is `inspectd.service.metrics`).

>>> m = Metrics(CollectorRegistry())
>>> m.frames_captured.labels(camera="line1-top").inc()
Nothing is registered at import time; tests use a private registry each.
"""

from __future__ import annotations

__all__ = ["Metrics", "FrameAccount", "frame_accounts", "BATCH_BUCKETS", "LATENCY_BUCKETS"]

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from inspectd import __version__

NS = "inspectd"
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Inference on CPU takes 0.05-1 s per batch; on a GPU a few ms: buckets cover both.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99)


class Metrics:
    """The daemon's metrics (names are a contract: Grafana and the alert rules use them)."""

    def __init__(self, registry: CollectorRegistry):
        # No `_created` series: one more per labelled counter/histogram, of no use to the alert rules or
        # dashboards (rate() needs none). prometheus_client's switch is process-wide.
        disable_created_metrics()
        self.registry = registry
        r = {"registry": registry, "namespace": NS}
        self.frames_captured = Counter("frames_captured", "Frames read from the camera", ["camera"], **r)
        self.frames_dropped = Counter("frames_dropped", "Frames not inferred, by reason (stale: replaced by a newer "
                                      "frame before inference; fps_limit; decode)", ["camera", "reason"], **r)
        self.frames_inferred = Counter("frames_inferred", "Frames run through the model", ["camera"], **r)
        self.defects = Counter("defects", "Frames judged defective (score >= threshold)", ["camera"], **r)
        self.episodes = Counter("episodes", "Defect episodes ended, by how they ended (frames, time, shutdown, "
                                "camera_stopped)", ["camera", "end"], **r)
        self.camera_up = Gauge("camera_up", "1 while the camera delivers frames, else 0", ["camera"], **r)
        self.camera_reconnects = Counter("camera_reconnects", "Reconnection attempts", ["camera"], **r)
        self.batch_size = Histogram("batch_size", "Real (unpadded) frames per inference batch", buckets=BATCH_BUCKETS, **r)
        self.inference_seconds = Histogram("inference_seconds", "Model call per batch (preprocess + forward)",
                                           buckets=LATENCY_BUCKETS, **r)
        self.end_to_end_seconds = Histogram("end_to_end_seconds", "Capture to publish, per frame", ["camera"],
                                            buckets=LATENCY_BUCKETS, **r)
        self.score = Histogram("score", "Defect score per inferred frame", ["camera"], buckets=SCORE_BUCKETS, **r)
        self.events_published = Counter("events_published", "ZeroMQ messages sent", ["topic"], **r)
        self.events_dropped = Counter("events_dropped", "ZeroMQ messages dropped (send queue full)", ["topic"], **r)
        self.archive_written = Counter("archive_written", "Entries written to the archive (defect events, sampled ok "
                                       "frames)", **r)
        self.archive_dropped = Counter("archive_dropped", "Archive entries lost, by reason (queue_full: the disk is "
                                       "slower than the defects; disk_full; read_only; permission; error)", ["reason"], **r)
        self.archive_errors = Counter("archive_errors", "Archive writes that failed (every reason but queue_full)", **r)
        self.archive_bytes = Gauge("archive_bytes", "Bytes in the archive's entries", **r)
        self.archive_entries = Gauge("archive_entries", "Entries in the archive", **r)
        self.replay_requests = Counter("replay_requests", "Replay requests answered, by how the answer ended "
                                       "(complete, partial, unknown_run, error)", ["status"], **r)
        self.replay_abandoned = Counter("replay_abandoned", "Replay answers abandoned: the consumer stopped reading "
                                        "or went away", **r)
        self.handshakes_refused = Counter("handshakes_refused", "ZeroMQ connections refused at the CURVE handshake, "
                                          "by socket (events, replay) and reason (auth: a client key not allowed; "
                                          "protocol: plain text or the wrong server key; other)", ["socket", "reason"], **r)
        self.reload_failures = Counter("reload_failures", "Reloads (SIGHUP) rejected; the old config/model kept", **r)
        self.model_info = Gauge("model_info", "The loaded model (value 1) and the runtime running it",
                                ["name", "sha256", "backbone", "input", "runtime", "device"], **r)
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

    def set_model(self, name: str, sha256: str, backbone: str, input_size: tuple[int, int], runtime: str,
                  device: str) -> None:
        """Export the loaded model, its runtime and device as the only `model_info` series."""
        self.model_info.clear()
        self.model_info.labels(name=name, sha256=sha256, backbone=backbone, input=f"{input_size[0]}x{input_size[1]}",
                               runtime=runtime, device=device).set(1)


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
        return (f"{self.camera}: captured {self.captured} = inferred {self.inferred} + dropped "
                f"{sum(self.dropped.values())} ({reasons}) + in flight {self.in_flight}; residual {self.residual}")


def frame_accounts(registry: CollectorRegistry, in_flight: Mapping[str, int] | None = None) -> list[FrameAccount]:
    """Every camera's frame account, from the counters in `registry` (plus frames still in flight)."""
    captured: dict[str, int] = defaultdict(int)
    inferred: dict[str, int] = defaultdict(int)
    dropped: dict[str, dict[str, int]] = defaultdict(dict)
    for metric in registry.collect():
        for s in metric.samples:
            cam = s.labels.get("camera")
            if s.name == f"{NS}_frames_captured_total":
                captured[cam] += int(s.value)
            elif s.name == f"{NS}_frames_inferred_total":
                inferred[cam] += int(s.value)
            elif s.name == f"{NS}_frames_dropped_total":
                dropped[cam][s.labels["reason"]] = int(s.value)
    in_flight = in_flight or {}
    cameras = sorted(set(captured) | set(inferred) | set(dropped) | set(in_flight))
    return [FrameAccount(c, captured[c], inferred[c], dropped[c], in_flight.get(c, 0)) for c in cameras]
