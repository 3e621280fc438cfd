"""The daemon's lifecycle: startup() -> main_loop() -> shutdown(), driven by signals.

    Daemon(load_settings(path)).run()

Startup order: metrics HTTP (so /healthz answers during warm-up) -> publisher (bind) -> model
(load, warm up) -> post-processing pool -> batcher -> cameras. Shutdown is that order reversed,
derived from an ExitStack, so it can never drift from startup: stop grabbing, finish and publish
the batch in flight, drain post-processing, flush and close the publisher, stop serving metrics.
"""

from __future__ import annotations

__all__ = ["Daemon"]

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import CollectorRegistry

from inspectd.batching import Batcher, FrameBoard, buckets_for
from inspectd.config import Settings, resolve_model_path
from inspectd.engine import InferenceEngine, select_device
from inspectd.frames import Batch, CameraState, Frame, Inspection
from inspectd.metrics import Metrics, MetricsServer
from inspectd.model.deployable import Deployable, load_model
from inspectd.notify import Notifier
from inspectd.postprocess import InspectOptions, inspect
from inspectd.reload import start_reload

log = logging.getLogger("inspectd.daemon")

STATUS_EVERY_S = 5.0
# Test-only hook: while the file named by this variable exists, the inference call blocks (a hung
# model call, to prove that the watchdog pings stop). Never set in production.
FREEZE_ENV = "INSPECTD_TEST_FREEZE_INFERENCE"


class Daemon:
    """The inspection daemon. `run()` returns the process exit code."""

    def __init__(self, settings: Settings, config_path: Path | None = None, notifier: Notifier | None = None):
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.reload_requested = threading.Event()
        self._freeze_file = os.environ.get(FREEZE_ENV)
        self.run_id = uuid.uuid4().hex
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.board = FrameBoard(on_stale=self._on_stale)
        self.camera_states: dict[str, CameraState] = {}
        self.should_exit = threading.Event()
        self.ready = False
        self._stack = contextlib.ExitStack()
        self._fps = 0.0
        self._last_defect: str = "none"
        self._inflight = threading.BoundedSemaphore(4 * settings.postprocess.workers)
        self.metrics_server: MetricsServer | None = None
        self.publisher = None
        self.engine: InferenceEngine | None = None
        self.deployable: Deployable | None = None
        self.options: InspectOptions | None = None
        self.batcher: Batcher | None = None
        self.cameras: dict = {}

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        with _signals(self):
            try:
                self.startup()
                if not self.should_exit.is_set():
                    self.main_loop()
            finally:
                self.shutdown()
        return 0

    def startup(self) -> None:
        s = self.settings
        self.metrics_server = MetricsServer(self.registry, s.metrics.host, s.metrics.port, self.healthz, self.readyz)
        self.metrics_server.start()
        self._stack.callback(self.metrics_server.stop)
        deployable = self._load_model()
        self._start_publisher(deployable)
        self.engine = self._start_engine(deployable)
        self._start_pipeline(deployable)
        self.ready = True
        self.notifier.ready()
        log.info("ready: %d camera(s), model %s, batches %s on %s, events on %s, metrics on :%d",
                 len(self.cameras), deployable.name, self.engine.buckets, self.engine.device,
                 self.publisher.endpoint, self.metrics_server.port)

    def main_loop(self) -> None:
        """Supervise: fps, systemd STATUS and watchdog pings (only while progressing), reloads."""
        last_count, last_t = self._inferred_total(), time.monotonic()
        last_status = last_ping = 0.0
        interval = self.notifier.watchdog_interval_s
        while not self.should_exit.wait(0.25):
            now = time.monotonic()
            if now - last_t >= 1.0:
                count = self._inferred_total()
                self._fps = (count - last_count) / (now - last_t)
                last_count, last_t = count, now
            if now - last_status >= STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = now
            if interval is not None and now - last_ping >= interval:
                last_ping = now if self._watchdog_ping() else last_ping
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                start_reload(self)

    def _watchdog_ping(self) -> bool:
        problems = self.problems()
        if problems:
            log.error("withholding the watchdog ping: %s", "; ".join(problems))
            return False
        return self.notifier.watchdog()

    def status_line(self) -> str:
        up = sum(1 for st in self.camera_states.values() if st == CameraState.UP)
        return f"{up}/{len(self.camera_states)} cameras up, {self._fps:.1f} frames/s inspected, last defect: {self._last_defect}"

    def shutdown(self) -> None:
        log.info("shutting down")
        self.notifier.stopping()
        self.ready = False
        self._stack.close()
        self.notifier.close()
        log.info("stopped")

    # -- startup steps -----------------------------------------------------------------------
    def _load_model(self) -> Deployable:
        from inspectd.tfload import import_tensorflow

        import_tensorflow()
        deployable = load_model(resolve_model_path(self.settings.model.path))
        self.set_model_info(deployable)
        return deployable

    def set_model_info(self, deployable: Deployable) -> None:
        self.deployable = deployable
        meta = deployable.meta
        self.metrics.set_model(deployable.name, deployable.sha256, meta.get("backbone", "unknown"), deployable.input_size)
        if self.publisher is not None:
            self.publisher.set_model({"name": deployable.name, "sha256": deployable.sha256})

    def _start_publisher(self, deployable: Deployable) -> None:
        from inspectd.publish import Publisher

        self.publisher = Publisher(self.settings.publish, self.metrics, self.run_id,
                                   {"name": deployable.name, "sha256": deployable.sha256}, stats=self.stats)
        self.publisher.start()
        self._stack.callback(self.publisher.stop, self.settings.daemon.shutdown_timeout_s)

    def _start_engine(self, deployable: Deployable, cfg: Settings | None = None) -> InferenceEngine:
        cfg = cfg or self.settings
        max_batch = cfg.batching.max_batch
        if max_batch == "auto":
            # On CPU batching lowers throughput (DESIGN's measured facts); on a GPU it raises it.
            max_batch = 1 if select_device(cfg.model.device).startswith("/CPU") else 8
        engine = InferenceEngine(deployable, buckets_for(max_batch), cfg.model.device, cfg.model.xla, cfg.model.precision)
        if cfg.daemon.warmup:
            t0 = time.monotonic()
            engine.warmup()
            log.info("warm-up of batch sizes %s took %.1f s", engine.buckets, time.monotonic() - t0)
        return engine

    def _start_pipeline(self, deployable: Deployable) -> None:
        s = self.settings
        self.options = inspect_options(s, deployable)
        pool = ThreadPoolExecutor(s.postprocess.workers, thread_name_prefix="postprocess")
        self._stack.callback(pool.shutdown, wait=True)
        self._pool = pool
        self.batcher = Batcher(self.board, self.engine.buckets[-1], s.batching.max_wait_ms, self._infer)
        self.batcher.start()
        self._stack.callback(self._stop_batcher)
        self._stack.callback(self._stop_all_cameras)
        for cam in s.cameras:
            self.start_camera(cam)

    def start_camera(self, cfg) -> None:
        from inspectd.sources.camera import CameraWorker

        worker = CameraWorker(cfg, self.board.put, self.metrics, on_state=self._on_camera_state)
        self.camera_states[cfg.id] = CameraState.STARTING
        self.metrics.camera_up.labels(camera=cfg.id).set(0)
        worker.start()
        self.cameras[cfg.id] = worker

    def stop_camera(self, camera: str, forget: bool = True) -> None:
        worker = self.cameras.pop(camera)
        worker.stop()
        if not worker.join(timeout=self.settings.daemon.shutdown_timeout_s):
            log.warning("camera %s: capture thread still blocked in its backend; leaving it", camera)
        self.board.drop(camera)
        if forget:
            self.camera_states.pop(camera, None)
            self.metrics.camera_up.remove(camera)

    def _stop_all_cameras(self) -> None:
        for camera in list(self.cameras):
            self.stop_camera(camera, forget=False)

    def _stop_batcher(self) -> None:
        self.batcher.stop()
        if not self.batcher.join(timeout=self.settings.daemon.shutdown_timeout_s):
            log.error("batcher did not finish the batch in flight within %.0f s", self.settings.daemon.shutdown_timeout_s)

    # -- the pipeline ------------------------------------------------------------------------
    def _infer(self, batch: Batch) -> None:
        """On the batcher thread: one model call, then post-processing off this thread."""
        engine, options = self.engine, self.options  # a reload swaps both between batches
        t0 = time.monotonic()
        while self._freeze_file and os.path.exists(self._freeze_file):
            time.sleep(0.1)  # test-only hook (FREEZE_ENV): a hung inference call
        scores, cams = engine.infer([f.image for f in batch.frames])
        self.metrics.inference_seconds.observe(time.monotonic() - t0)
        self.metrics.batch_size.observe(len(batch.frames))
        for frame, score, cam in zip(batch.frames, scores, cams):
            self.metrics.frames_inferred.labels(camera=frame.camera).inc()
            self.metrics.score.labels(camera=frame.camera).observe(float(score))
            # Bounded hand-off: if post-processing falls behind, inference waits here, and the
            # cameras' slots turn stale (counted) instead of a queue growing.
            self._inflight.acquire()
            future = self._pool.submit(inspect, frame, float(score), cam, options)
            future.add_done_callback(self._published)

    def _published(self, future) -> None:
        try:
            insp: Inspection = future.result()
            self.publisher.publish_inspection(insp)
            frame = insp.frame
            if insp.is_defect:
                self.metrics.defects.labels(camera=frame.camera).inc()
                self._last_defect = f"{frame.camera} #{frame.seq} score {insp.score:.2f}"
            self.metrics.end_to_end_seconds.labels(camera=frame.camera).observe(time.monotonic() - frame.captured_mono)
        except Exception:
            log.exception("post-processing failed")
        finally:
            self._inflight.release()

    def _on_stale(self, frame: Frame) -> None:
        self.metrics.frames_dropped.labels(camera=frame.camera, reason="stale").inc()

    def _on_camera_state(self, camera: str, state: CameraState, detail: str) -> None:
        self.camera_states[camera] = state
        if self.publisher is not None:
            self.publisher.publish_status(camera, state, detail)

    # -- health --------------------------------------------------------------------------------
    def _inferred_total(self) -> float:
        return sum(self.registry.get_sample_value("inspectd_frames_inferred_total", {"camera": c}) or 0.0
                   for c in self.camera_states)

    def stats(self) -> dict:
        """Heartbeat and STATUS summary: inspected fps, camera states, last defect."""
        return {"fps": round(self._fps, 2), "cameras": {c: s.value for c, s in self.camera_states.items()},
                "last_defect": self._last_defect}

    def problems(self) -> list[str]:
        """Stages that are dead or stuck inside one call (empty = progressing)."""
        now = time.monotonic()
        stuck_after = self.settings.daemon.stuck_after_s
        out = []
        if self.batcher is not None:
            if not self.batcher.alive and not self.should_exit.is_set():
                out.append("batcher thread died")
            if self.batcher.busy_since is not None and now - self.batcher.busy_since > stuck_after:
                out.append(f"inference stuck for {now - self.batcher.busy_since:.0f} s")
            elif now - self.batcher.heartbeat_mono > stuck_after and self.batcher.busy_since is None:
                out.append("batcher loop not progressing")
        if self.publisher is not None and now - self.publisher.last_progress_mono > stuck_after:
            out.append("publisher not progressing")
        for cam, worker in list(self.cameras.items()):
            # An OpenCV read can legitimately block for about 3x its timeout inside FFmpeg.
            limit = max(stuck_after, 3 * worker.cfg.open_timeout_s + 5)
            if worker.join(timeout=0) and not self.should_exit.is_set():
                out.append(f"camera {cam}: capture thread died")
            elif now - worker.heartbeat_mono > limit:
                out.append(f"camera {cam}: capture loop stuck for {now - worker.heartbeat_mono:.0f} s")
        return out

    def healthz(self) -> tuple[bool, str]:
        problems = self.problems()
        return (not problems, "; ".join(problems) or "pipeline progressing")

    def readyz(self) -> tuple[bool, str]:
        bound = self.publisher is not None and self.publisher.bound
        return (self.ready and bound, "model warm, publisher bound" if self.ready and bound else "starting")


def inspect_options(s: Settings, deployable: Deployable) -> InspectOptions:
    """How inference results become Inspections, from the config and the model's own thresholds."""
    return InspectOptions(
        threshold=deployable.threshold if s.model.threshold is None else s.model.threshold,
        mask_threshold=deployable.mask_threshold if s.model.mask_threshold is None else s.model.mask_threshold,
        mask_resolution=s.postprocess.mask_resolution, min_region_px=s.postprocess.min_region_px,
        attach_frame=s.publish.attach_frame, jpeg_quality=s.postprocess.jpeg_quality, mask_for_all=s.publish.results)


@contextlib.contextmanager
def _signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT ask for a clean stop; a second SIGINT forces exit; SIGHUP asks for a reload.

    Handlers only set flags; the main loop acts on them. Old handlers are restored."""

    def stop(signum, _frame):
        if signum == signal.SIGINT and daemon.should_exit.is_set():
            log.warning("second interrupt: exiting now")
            raise SystemExit(130)
        log.info("received %s: stopping", signal.Signals(signum).name)
        daemon.should_exit.set()

    def reload(signum, _frame):
        daemon.reload_requested.set()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
