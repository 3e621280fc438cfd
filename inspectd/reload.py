"""SIGHUP (`systemctl reload inspectd`): re-read the config file and the model file, apply what changed.

Everything that can fail happens first (parse and validate the config, load and warm up a new
model beside the running one); only then is anything swapped. A failure keeps the old config and
model running, is logged in one line and counted in `inspectd_reload_failures_total`. Cameras
whose settings did not change keep streaming without a gap; the new engine is swapped in between
batches. Runs on its own thread so that the main loop keeps serving the watchdog during a long
warm-up.
"""

from __future__ import annotations

__all__ = ["camera_changes", "engine_changed", "restart_only_changes", "start_reload", "reload"]

import logging
import threading
import time

from inspectd.config import Settings, load_settings, resolve_model_path
from inspectd.model.deployable import file_sha256, load_model

log = logging.getLogger("inspectd.reload")

_lock = threading.Lock()  # one reload at a time


def camera_changes(old: Settings, new: Settings) -> tuple[list, list[str], list]:
    """(added configs, removed ids, changed configs) between two settings."""
    before = {c.id: c for c in old.cameras}
    after = {c.id: c for c in new.cameras}
    added = [c for cid, c in after.items() if cid not in before]
    removed = [cid for cid in before if cid not in after]
    changed = [c for cid, c in after.items() if cid in before and before[cid] != c]
    return added, removed, changed


def engine_changed(old: Settings, new: Settings, running_sha256: str) -> bool:
    """A new engine is needed when the model settings, the batching or the model file changed."""
    if old.model.model_dump(exclude={"threshold", "mask_threshold"}) != new.model.model_dump(
            exclude={"threshold", "mask_threshold"}) or old.batching != new.batching:
        return True
    return file_sha256(resolve_model_path(new.model.path)) != running_sha256


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Settings a reload cannot apply (sockets already bound, pool sizes): they need a restart."""
    out = [name for name in ("publish", "metrics", "daemon") if getattr(old, name) != getattr(new, name)]
    if old.postprocess.workers != new.postprocess.workers:
        out.append("postprocess.workers")
    return out


def start_reload(daemon) -> None:
    if not _lock.acquire(blocking=False):
        log.warning("reload requested while one is in progress; ignored")
        return
    threading.Thread(target=_run, args=(daemon,), name="reload", daemon=True).start()


def _run(daemon) -> None:
    try:
        reload(daemon)
    finally:
        _lock.release()


def reload(daemon) -> bool:
    """Reload config and model into a running daemon; True if applied."""
    daemon.notifier.reloading()
    t0 = time.monotonic()
    try:
        if daemon.config_path is None:
            raise ValueError("the daemon was started without a config file")
        new = load_settings(daemon.config_path)
        deployable, engine = daemon.deployable, None
        if engine_changed(daemon.settings, new, daemon.deployable.sha256):
            deployable = load_model(resolve_model_path(new.model.path))
            engine = daemon._start_engine(deployable, new)  # warmed up beside the running one
        _apply(daemon, new, deployable, engine)
        log.info("reloaded %s in %.1f s", daemon.config_path, time.monotonic() - t0)
        return True
    except Exception as exc:  # any failure: keep what runs, say why in one line, count it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.error("reload rejected, keeping the running config and model: %s", first)
        daemon.metrics.reload_failures.inc()
        return False
    finally:
        daemon.notifier.ready()


def _apply(daemon, new: Settings, deployable, engine) -> None:
    from inspectd.daemon import inspect_options

    old = daemon.settings
    for section in restart_only_changes(old, new):
        log.warning("reload: changes to [%s] take effect at the next restart", section)
    if engine is not None:
        daemon.engine = engine  # the batch in flight finishes with the old one
        daemon.batcher.max_batch = engine.buckets[-1]
        daemon.set_model_info(deployable)
        log.info("reload: now using model %s (sha256 %s...)", deployable.name, deployable.sha256[:12])
    daemon.options = inspect_options(new, deployable)
    added, removed, changed = camera_changes(old, new)
    daemon.settings = new
    for cid in removed + [c.id for c in changed]:
        daemon.stop_camera(cid)
    for cfg in changed + added:
        daemon.start_camera(cfg)
    if added or removed or changed:
        log.info("reload: cameras added %s, removed %s, restarted %s",
                 [c.id for c in added], removed, [c.id for c in changed])
