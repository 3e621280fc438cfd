"""The daemon's lifecycle: startup() -> main_loop() -> shutdown(), driven by signals.

    Daemon(load_settings(path)).run()

Startup order: metrics HTTP (so /healthz answers during warm-up) -> live view HTTP ([ui], bound
early so that a port in use fails at once) -> model (load in safe mode) -> publisher (bind) ->
engine (warm up) -> pipeline (inference thread, post-processing pool) -> cameras. Shutdown is that
order reversed, derived from an ExitStack, so it can never drift from startup: stop grabbing,
finish and publish the batch in flight, drain post-processing, log every camera's frame account,
flush and close the publisher, stop serving metrics. The frame's route itself lives in
`inspectd.pipeline.core.Pipeline`; the daemon only starts, supervises, reloads and stops.
"""

from __future__ import annotations

__all__ = ["Daemon"]

import contextlib
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from prometheus_client import CollectorRegistry

from inspectd import __version__, hangup
from inspectd.config import CameraConfig, Settings, UiConfig
from inspectd.errors import ConfigError
from inspectd.frames import CameraState, PartResult
from inspectd.metrics import FrameAccount, Metrics, accounts
from inspectd.model.deployable import Deployable, load_model, resolve_model_path
from inspectd.outputs.archive import DROP_REASONS, Archive
from inspectd.outputs.fanout import Fanout
from inspectd.outputs.live import LiveView
from inspectd.outputs.partlog import PartLog
from inspectd.outputs.publish import Publisher
from inspectd.outputs.recent import ArchiveDefects, MemoryDefects
from inspectd.outputs.replay import ReplayServer, Ring
from inspectd.pipeline.context import InferenceContext, build_context
from inspectd.pipeline.core import Pipeline
from inspectd.security import ServerKeys, is_loopback_endpoint
from inspectd.service.metrics import MetricsServer
from inspectd.service.notify import Notifier
from inspectd.service.reload import PreparedReload, prepare_reload
from inspectd.service.trigger import TriggerServer
from inspectd.service.web import WebServer, web_security
from inspectd.sources.camera import CameraWorker

if TYPE_CHECKING:
    from inspectd.outputs.ui import UiApp

log = logging.getLogger("inspectd.service.daemon")

STATUS_EVERY_S = 5.0
# A live stream falls at most this far behind the pictures drawn (a few pictures), even on a slow SSH tunnel.
_UI_SEND_BUFFER = 128 * 1024


class Daemon:
    """The inspection daemon. `run()` returns the process exit code."""

    def __init__(self, settings: Settings, config_path: Path | None = None, notifier: Notifier | None = None):
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.reload_requested = threading.Event()
        self.run_id = uuid.uuid4().hex
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.camera_states: dict[str, CameraState] = {}
        self.camera_details: dict[str, str] = {}  # the detail of each camera's last state change (live view)
        self.cameras: dict[str, CameraWorker] = {}
        self.should_exit = threading.Event()
        self.ready = False
        self._stack = contextlib.ExitStack()
        self._fps = 0.0
        self.saturated = False  # frames were dropped as stale in the last second: inference cannot keep up
        # Reloads are prepared on a thread of their own and applied here, on the main loop's thread.
        self._reloads: queue.SimpleQueue[PreparedReload | Exception] = queue.SimpleQueue()
        self._reload_thread: threading.Thread | None = None
        self.metrics_server: MetricsServer | None = None
        self.publisher: Publisher | None = None
        self.archive: Archive | None = None
        self.partlog: PartLog | None = None  # with the archive: every part's verdict (part mode)
        self.replay: ReplayServer | None = None
        self.trigger: TriggerServer | None = None
        self.pipeline: Pipeline | None = None
        self.live: LiveView | None = None
        self.ui_server: WebServer | None = None
        self._ui_app: UiApp | None = None  # while [ui] is on
        self._exposed: list[str] = []  # sockets open to the network without CURVE (notes on /healthz)

    @property
    def _pipeline(self) -> Pipeline:
        """The pipeline, for what runs only once startup() has made it (cameras, the main loop, reloads)."""
        return cast(Pipeline, self.pipeline)

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
        keys = self._server_keys()
        self.metrics_server = MetricsServer(
            self.registry, s.metrics.host, s.metrics.port, self.healthz, self.readyz, web=web_security(s.metrics)
        )
        self.metrics_server.start()
        self._stack.callback(self.metrics_server.stop)
        self.ui_server = self._bind_ui()
        deployables = self._load_models()
        first = deployables[s.model_entries[0].id]
        outputs = Fanout()  # the outputs beside ZeroMQ: each hears what became of every message published
        self.archive = self._start_archive(outputs)
        if self.archive is not None:
            self.partlog = PartLog(Path(s.archive.dir), self.run_id, s.archive.max_age_s)
            self._stack.callback(self.partlog.close)
        if self.ui_server is not None:
            self._start_ui(outputs)
        ring = Ring(s.replay.ring_messages, s.replay.ring_bytes) if s.replay.endpoint else None
        if ring is not None:
            outputs.listen("replay ring", ring.on_outcome)
        self.publisher = Publisher(
            s.publish,
            self.metrics,
            self.run_id,
            {"id": s.model_entries[0].id, "name": first.name, "sha256": first.sha256},
            stats=self.stats,
            keys=keys,
            outcome=outputs,
        )
        self.publisher.start()
        self._stack.callback(self.publisher.stop, s.daemon.shutdown_timeout_s)
        if ring is not None:
            self.replay = ReplayServer(
                s.replay, self.run_id, ring, self.archive, self.metrics, self.publisher.last_seq, keys
            ).start()
            self._stack.callback(self.replay.stop)
        self._warn_exposed(keys, self.publisher)
        context = build_context(s, deployables)
        self._set_model_info(context)
        self.pipeline = Pipeline(
            context,
            self.metrics,
            self.publisher,
            s.postprocess.workers,
            observer=self.live.offer if self.live is not None else None,
            parts=self._publish_part,
            late=self.partlog.late if self.partlog is not None else (lambda insp, result: None),
            shadow_dir=Path(s.archive.dir) if s.archive.dir else None,
        )
        self.pipeline.start()
        self._stack.callback(self._log_frame_accounts)
        self._stack.callback(self.pipeline.stop, s.daemon.shutdown_timeout_s)
        self._stack.callback(self._stop_all_cameras)
        if s.trigger.endpoint:  # before the cameras it asks for: a port in use fails at once
            self.trigger = TriggerServer(s.trigger, self.cameras.get, self.metrics, keys).start()
            self._stack.callback(self.trigger.stop)
        for cam in s.cameras:
            self.start_camera(cam)
        self.ready = True
        self.notifier.ready()
        log.info(
            "ready: %d camera(s), %s, events on %s, replay %s, metrics on :%d, live view %s",
            len(self.cameras),
            "; ".join(
                f"model {run.id} {run.deployable.name} batches {run.engine.buckets} on {run.engine.device} "
                f"with {run.engine.runtime}"
                for run in context.runs.values()
            ),
            self.publisher.endpoint,
            f"on {self.replay.endpoint}" if self.replay else "off",
            self.metrics_server.port,
            self.ui_url() or "off",
        )

    def main_loop(self) -> None:
        """Supervise: fps, systemd STATUS and watchdog pings (only while progressing), reloads."""
        last_count, last_t = self._inferred_total(), time.monotonic()
        last_stale = self._stale_total()
        last_status = last_ping = 0.0
        interval = self.notifier.watchdog_interval_s
        while not self.should_exit.wait(0.25):
            now = time.monotonic()
            if now - last_t >= 1.0:
                count, stale = self._inferred_total(), self._stale_total()
                self._fps = (count - last_count) / (now - last_t)
                self.saturated = stale > last_stale
                last_count, last_t, last_stale = count, now, stale
            if now - last_status >= STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = now
            if interval is not None and now - last_ping >= interval:
                last_ping = now if self._watchdog_ping() else last_ping
            self._finish_reload()
            self._pipeline.tick()  # episodes of cameras that went quiet end by time
            # One reload at a time, each planned on the settings the previous one left: a SIGHUP
            # during a reload is kept and served after it.
            if self.reload_requested.is_set() and not self._reload_busy():
                self.reload_requested.clear()
                self._begin_reload()

    def shutdown(self) -> None:
        log.info("shutting down")
        self.notifier.stopping()
        self.ready = False
        self._stack.close()
        self.notifier.close()
        log.info("stopped")

    def _watchdog_ping(self) -> bool:
        problems = self.problems()
        if problems:
            log.error("withholding the watchdog ping: %s", "; ".join(problems))
            return False
        return self.notifier.watchdog()

    def status_line(self) -> str:
        up = sum(1 for st in self.camera_states.values() if st == CameraState.UP)
        return (
            f"{up}/{len(self.camera_states)} cameras up, {self._fps:.1f} frames/s inspected, "
            f"last defect: {self.pipeline.last_defect if self.pipeline else 'none'}"
        )

    # -- model and cameras ------------------------------------------------------------------
    def _server_keys(self) -> ServerKeys | None:
        """The CURVE key pair and allow-list of every socket the daemon binds (ConfigError before anything binds)."""
        cfg = self.settings.publish
        return ServerKeys.load(cfg.curve_secret_key, cfg.curve_clients) if cfg.curve_secret_key else None

    def _warn_exposed(self, keys: ServerKeys | None, publisher: Publisher) -> None:
        """Plain text that other machines can reach (events, replay, triggers; passwords to /metrics): a warning now, and
        a note on /healthz for as long as it runs."""
        m = self.settings.metrics
        bound = [("events", publisher.endpoint)] + ([("replay", self.replay.endpoint)] if self.replay else [])
        if self.settings.trigger.endpoint:  # bound after the pipeline: its configured address says where
            bound.append(("triggers", self.settings.trigger.endpoint))
        if keys is None:
            self._exposed += [
                f"{name} on {endpoint} in plain text, open to the network: set publish.curve_secret_key "
                "and publish.curve_clients (docs/security.md)"
                for name, endpoint in bound
                if not is_loopback_endpoint(endpoint)
            ]
        for name, web, what in (("metrics", m, "metrics"), ("ui", self.settings.ui, "the live view")):
            if isinstance(web, UiConfig) and not web.enabled:  # name == "ui"
                continue
            if web.basic_auth_users and not web.tls_cert_file and not is_loopback_endpoint(f"tcp://{web.host}:{web.port}"):
                self._exposed.append(
                    f"passwords to {what} on {web.host}:{web.port} go over plain HTTP: set "
                    f"{name}.tls_cert_file and {name}.tls_key_file (docs/security.md)"
                )
        for note in self._exposed:
            log.warning("%s", note)

    # -- the live view ([ui]) ------------------------------------------------------------------
    def _bind_ui(self) -> WebServer | None:
        """Bind the live view's port (ConfigError naming ui.port / ui.host); it serves from _start_ui on."""
        cfg = self.settings.ui
        if not cfg.enabled:
            return None
        from inspectd.outputs.ui import UiApp

        self.live = LiveView(cfg.max_fps, cfg.width, saturated=lambda: self.saturated, map_mode=cfg.map)
        web = web_security(cfg, "ui")
        self._ui_app = UiApp(
            self.live,
            MemoryDefects(),
            self.ui_state,
            collect_dir=Path(cfg.collect_dir) if cfg.collect_dir else None,
            auth=web is not None and web.users is not None,
            recent_limit=cfg.recent,
            host=cfg.host,
        )
        server = WebServer(
            self._ui_app, cfg.host, cfg.port, web, section="ui", what="the live view", name="ui-http", send_buffer=_UI_SEND_BUFFER
        )
        self._stack.callback(server.stop)
        return server

    def _start_ui(self, outputs: Fanout) -> None:
        """Serve: recent defects from the archive when it is on, else from memory (a listener of the publisher)."""
        cfg = self.settings.ui
        # _bind_ui made all three (startup calls this only when it bound the port).
        app, live, server = cast("UiApp", self._ui_app), cast(LiveView, self.live), cast(WebServer, self.ui_server)
        if self.archive is not None:
            app.recent = ArchiveDefects(self.archive)
        else:
            recent = MemoryDefects(cfg.recent, cfg.recent_bytes, prefix=self.run_id[:12])
            outputs.listen("recent defects", recent.on_outcome)
            app.recent = recent
        live.start()
        self._stack.callback(live.stop)
        server.start()
        log.info(
            "live view on %s (recent defects from %s%s)",
            self.ui_url(),
            "the archive" if self.archive is not None else "memory",
            f", frame collection into {cfg.collect_dir}" if cfg.collect_dir else "",
        )

    def ui_url(self) -> str | None:
        if self.ui_server is None:
            return None
        host = self.settings.ui.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.ui_server.scheme}://{host}:{self.ui_server.port}/"

    def ui_state(self) -> dict:
        """The cameras as the live view shows them: state, its detail, frame counters (totals)."""
        by_camera = {a.camera: a for a in accounts(self.metrics)}
        reconnects = {key[0]: value for key, value in self.metrics.camera_reconnects.values().items()}
        context = self.pipeline.context if self.pipeline is not None else None
        cameras = []
        for camera, state in list(self.camera_states.items()):
            account = by_camera.get(camera) or FrameAccount(camera)
            cameras.append(
                {
                    "id": camera,
                    "state": state.value,
                    "detail": self.camera_details.get(camera, ""),
                    "captured": account.captured,
                    "inspected": account.inferred,
                    "dropped": sum(account.dropped.values()),
                    "reconnects": int(reconnects.get(camera, 0)),
                    "model": context.run_for(camera).model if context is not None else {},
                }
            )
        model = context.default.model if context is not None else {}
        return {
            "cameras": cameras,
            "model": model,
            "run_id": self.run_id,
            "version": __version__,
            "fps": round(self._fps, 2),
            "ready": self.ready,
            "saturated": self.saturated,
        }

    def _load_models(self) -> dict[str, Deployable]:
        """Every model's file, by id (.keras: safe mode, TensorFlow imported; exported folders: neither)."""
        return {entry.id: load_model(resolve_model_path(entry.path)) for entry in self.settings.model_entries}

    def _set_model_info(self, context: InferenceContext) -> None:
        self.metrics.set_models(context.runs.values(), {shadow: model for model, shadow in context.shadows.items()})
        self.metrics.set_cameras({cam.id: (context.model_of(cam.id), cam.mode) for cam in self.settings.cameras})

    def _start_archive(self, outputs: Fanout) -> Archive | None:
        """The archive's writer (None when `[archive] dir` is empty), listening to the publisher; stopped after it."""
        cfg = self.settings.archive
        if not cfg.dir:
            return None
        archive = Archive(
            Path(cfg.dir),
            cfg.queue_size,
            cfg.max_bytes,
            cfg.max_age_s,
            on_drop=self.metrics.archive_drop,
            on_written=self.metrics.archive_written.inc,
        )
        try:
            archive.start()
        except OSError as exc:
            raise ConfigError(f"archive.dir {cfg.dir!r}: cannot use it: {exc.strerror or exc}") from None
        self._stack.callback(archive.stop, self.settings.daemon.shutdown_timeout_s)
        self.metrics.watch_archive(archive, DROP_REASONS)
        outputs.listen("archive", archive.on_outcome)
        log.info(
            "archive in %s: %d entries, %.1f MB (limits: %s, %s)",
            cfg.dir,
            len(archive.index),
            archive.index.total_bytes / 1e6,
            f"{cfg.max_bytes / 1e9:g} GB" if cfg.max_bytes else "no size limit",
            f"{cfg.max_age_s / 86400:g} days" if cfg.max_age_s else "no age limit",
        )
        return archive

    def _publish_part(self, result: PartResult, model: dict) -> None:
        """A part's verdict: into the part log first (what a consumer saw is always there), then out."""
        if self.partlog is not None:
            self.partlog.record(result, model)
        if self.publisher is not None:
            self.publisher.publish_part(result, model)

    def start_camera(self, cfg: CameraConfig) -> None:
        pipeline = self._pipeline
        if cfg.mode == "parts":
            pipeline.set_part_mode(cfg.id, cfg.part_queue, cfg.not_inspected)
        worker = CameraWorker(
            cfg,
            pipeline.put,
            self.metrics,
            on_state=self._on_camera_state,
            lost=pipeline.lost,
            max_triggers=self.settings.trigger.max_pending,
        )
        self.camera_states[cfg.id] = CameraState.STARTING
        if self.live is not None:
            self.live.add(cfg.id)
        self.metrics.camera_up.labels(camera=cfg.id).set(0)
        worker.start()
        self.cameras[cfg.id] = worker

    def stop_camera(self, camera: str, forget: bool = True, deadline: float | None = None) -> None:
        """Stop one camera and wait for its thread until `deadline` (monotonic; default shutdown_timeout_s from now)."""
        worker = self.cameras.pop(camera)
        worker.stop()
        if deadline is None:
            deadline = time.monotonic() + self.settings.daemon.shutdown_timeout_s
        if not worker.join(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("camera %s: capture thread still blocked in its backend; leaving it", camera)
        self._pipeline.remove_camera(camera, "camera_stopped" if forget else "shutdown")
        if forget:
            self.camera_states.pop(camera, None)
            self.camera_details.pop(camera, None)
            if self.live is not None:
                self.live.forget(camera)
            self.metrics.camera_up.remove(camera)

    def _stop_all_cameras(self) -> None:
        """Tell every camera to stop at once, then wait for them against one deadline: a shutdown with
        several cameras stuck in their backends takes shutdown_timeout_s, not that once per camera."""
        for worker in self.cameras.values():
            worker.stop()
        deadline = time.monotonic() + self.settings.daemon.shutdown_timeout_s
        for camera in list(self.cameras):
            self.stop_camera(camera, forget=False, deadline=deadline)

    def _on_camera_state(self, camera: str, state: CameraState, detail: str) -> None:
        self.camera_states[camera] = state
        self.camera_details[camera] = detail
        if self.publisher is not None:
            self.publisher.publish_status(camera, state, detail)

    # -- frame accounting ----------------------------------------------------------------------
    def frame_accounts(self) -> list[FrameAccount]:
        """captured = inferred + dropped + in flight, per camera (exact once the pipeline has stopped)."""
        return accounts(self.metrics, self.pipeline.in_flight() if self.pipeline else {})

    def _log_frame_accounts(self) -> None:
        for account in self.frame_accounts():
            log.log(logging.INFO if account.residual == 0 else logging.ERROR, "frames %s", account)

    # -- reload (SIGHUP) -----------------------------------------------------------------------
    def _reload_busy(self) -> bool:
        """A reload is being prepared, or prepared and not yet applied."""
        return (self._reload_thread is not None and self._reload_thread.is_alive()) or not self._reloads.empty()

    def _begin_reload(self) -> None:
        """Prepare on a thread of its own (a warm-up takes seconds; the watchdog keeps being served)."""
        self.notifier.reloading()
        self._reload_thread = threading.Thread(target=self._prepare_reload, name="reload", daemon=True)
        self._reload_thread.start()

    def _prepare_reload(self) -> None:
        try:
            if self.config_path is None:
                raise ValueError("the daemon was started without a config file")
            self._reloads.put(prepare_reload(self.config_path, self.settings, self._pipeline.context))
        except Exception as exc:  # any failure: nothing was touched
            self._reloads.put(exc)

    def _finish_reload(self) -> None:
        """Apply a prepared reload (or report its failure), on the main loop's thread."""
        try:
            prepared = self._reloads.get_nowait()
        except queue.Empty:
            return
        try:
            if isinstance(prepared, Exception):  # nothing was touched: keep what runs, say why in one line
                first = (str(prepared).strip().splitlines() or [type(prepared).__name__])[0]
                log.error("reload rejected, keeping the running config and model: %s", first)
                self.metrics.reload_failures.inc()
            else:
                self.apply_reload(prepared)
        except Exception:  # a bug while applying: say so with the traceback, never claim nothing changed
            log.exception("reload failed while being applied; the running state may be partly reloaded")
            self.metrics.reload_failures.inc()
        finally:
            self.notifier.ready()

    def apply_reload(self, prepared: PreparedReload) -> None:
        """Carry out a prepared plan: the context in one swap, then the cameras."""
        plan = prepared.plan
        if prepared.context is not None:
            self._pipeline.swap(prepared.context)
        for camera in plan.stop_cameras + tuple(c.id for c in plan.restart_cameras):
            self.stop_camera(camera)
        self.settings = plan.effective
        self._set_model_info(self._pipeline.context)
        for cfg in plan.restart_cameras + plan.start_cameras:
            self.start_camera(cfg)
        for line in plan.describe():
            log.info("reload: %s", line)

    # -- health --------------------------------------------------------------------------------
    def _stale_total(self) -> float:
        """Frames replaced by newer ones before the model took them (all cameras): it grows when inference is
        the bottleneck."""
        return self.metrics.frames_dropped.total(reason="stale")

    def _inferred_total(self) -> float:
        return self.metrics.frames_inferred.total()

    def stats(self) -> dict:
        """Heartbeat and STATUS summary: inspected fps, camera states, last defect, the model in use."""
        states = list(self.camera_states.items())  # one atomic copy: reloads add and remove cameras
        out = {
            "fps": round(self._fps, 2),
            "cameras": {c: s.value for c, s in states},
            "last_defect": self.pipeline.last_defect if self.pipeline else "none",
        }
        if self.pipeline is not None:
            context = self.pipeline.context
            out["model"] = context.default.model
            out["models"] = {run.id: {k: v for k, v in run.model.items() if k != "id"} for run in context.runs.values()}
            out["camera_models"] = {cam: context.model_of(cam) for cam, _ in states}
        return out

    def problems(self) -> list[str]:
        """Stages that are dead or stuck inside one call (empty = progressing)."""
        now = time.monotonic()
        stuck_after = self.settings.daemon.stuck_after_s
        out = []
        pipe = self.pipeline
        if pipe is not None:
            busy_since = pipe.busy_since
            if not pipe.alive and not self.should_exit.is_set():
                out.append("inference thread died")
            if busy_since is not None and now - busy_since > stuck_after:
                out.append(f"inference stuck for {now - busy_since:.0f} s")
            elif busy_since is None and now - pipe.heartbeat_mono > stuck_after:
                out.append("inference loop not progressing")
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

    def notes(self) -> list[str]:
        """What /healthz reports without failing: losses that do not stop inspection (a full archive disk
        must not have systemd restart the daemon)."""
        out = list(self._exposed)
        archive = self.archive
        if archive is not None:
            losing = archive.losing()
            if losing:
                out.append(losing)
            if not archive.alive and not self.should_exit.is_set():
                out.append("archive writer stopped: defect events are not being archived")
        if self.replay is not None and not self.replay.alive and not self.should_exit.is_set():
            out.append("replay endpoint stopped: consumers cannot fill gaps")
        if self.trigger is not None and not self.trigger.alive and not self.should_exit.is_set():
            out.append("trigger endpoint stopped: parts cannot be asked for")
        return out

    def healthz(self) -> tuple[bool, str]:
        problems = self.problems()
        return (not problems, "; ".join((problems or ["pipeline progressing"]) + self.notes()))

    def readyz(self) -> tuple[bool, str]:
        """Ready: the model is warm, the publisher bound, and a camera has delivered a frame or is up waiting for
        triggers (a daemon whose every camera is unreachable inspects nothing: not ready, though healthy)."""
        bound = self.publisher is not None and self.publisher.bound
        if not (self.ready and bound):
            return False, "starting" if not self.should_exit.is_set() else "stopping"
        if not self.metrics.frames_captured.total() and CameraState.UP not in self.camera_states.values():
            down = ", ".join(f"{c}: {self.camera_details.get(c) or s.value}" for c, s in sorted(self.camera_states.items()))
            return False, f"model warm, publisher bound; waiting for a first frame from any camera ({down})"
        return True, "model warm, publisher bound, a camera up"


@contextlib.contextmanager
def _signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT ask for a clean stop; a second SIGINT forces exit; SIGHUP asks for a reload.

    Handlers only set flags; the main loop acts on them. Old handlers are restored: for `inspectd run`,
    SIGHUP's is `inspectd.hangup`'s, which records it, so a HUP at the end of a clean stop is harmless."""

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
    if hangup.take():  # held since the process started (inspectd.hangup): the config may have changed since
        daemon.reload_requested.set()
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
