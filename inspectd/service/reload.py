"""SIGHUP (`systemctl reload inspectd`) as a plan: what changed, and what each change needs.

`plan_reload(old, new, running_sha256, new_sha256)` is a pure function from the running settings,
the new settings and the model files' hashes to a `ReloadPlan`: load a model (and build a new
engine), swap the inference context, stop / start / restart cameras, and the keys that only a
restart can apply. `prepare_reload` does the slow and fallible part on the reload thread (read and
validate the config, hash the model file, load and warm up a new engine beside the running one);
the daemon then applies the prepared plan on its main thread, the context in one assignment.
A failure anywhere before applying keeps everything as it runs.
"""

from __future__ import annotations

__all__ = [
    "ReloadPlan",
    "PreparedReload",
    "plan_reload",
    "prepare_reload",
    "changed_keys",
    "ENGINE_KEYS",
    "CONTEXT_KEYS",
    "LIVE_KEYS",
    "RESTART_KEYS",
]

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from inspectd.config import CameraConfig, Reload, Settings, load_settings, reload_table
from inspectd.model.deployable import file_sha256, load_model, resolve_model_path
from inspectd.pipeline.context import CAMERA_OPTION_KEYS, InferenceContext, build_context, camera_options, inspect_options

log = logging.getLogger("inspectd.service.reload")

# Every key outside [[cameras]] by how a reload treats it, derived from the fields' declarations
# (`inspectd.config.base.setting(reload=...)`): ENGINE (a new engine, warmed up, then the context swapped),
# CONTEXT (a new inference context with the same engine), LIVE (read at each use), RESTART (bound at start-up).
_TABLE = reload_table()
ENGINE_KEYS, CONTEXT_KEYS, LIVE_KEYS, RESTART_KEYS = (
    tuple(key for key, how in _TABLE.items() if how is kind)
    for kind in (Reload.ENGINE, Reload.CONTEXT, Reload.LIVE, Reload.RESTART)
)
_APPLIED_KEYS = ENGINE_KEYS + CONTEXT_KEYS + LIVE_KEYS


def _flatten(settings: Settings) -> dict[str, object]:
    """{"section.key": value} for every key outside [[cameras]]."""
    dumped = settings.model_dump(mode="json", exclude={"cameras"})
    return {f"{section}.{key}": value for section, values in dumped.items() for key, value in values.items()}


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys (outside [[cameras]]) whose value differs, in config order."""
    a, b = _flatten(old), _flatten(new)
    return [key for key in b if a.get(key) != b[key]]


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does. `effective` is the settings the daemon runs with afterwards: the new ones,
    except the sections whose changes need a restart, which keep their running values."""

    effective: Settings
    load_model: bool  # a new engine: model file, device, precision, xla, runtime or max_batch changed
    swap_context: bool  # a new inference context (new engine, or new thresholds / output options / wait)
    applied: tuple[str, ...]  # keys that take effect now
    needs_restart: tuple[str, ...]  # keys that changed but apply only at the next restart
    stop_cameras: tuple[str, ...] = ()  # removed
    start_cameras: tuple[CameraConfig, ...] = ()  # added
    restart_cameras: tuple[CameraConfig, ...] = ()  # changed (new config)

    @property
    def noop(self) -> bool:
        return not (self.applied or self.stop_cameras or self.start_cameras or self.restart_cameras)

    def describe(self) -> list[str]:
        """Log lines: exactly what applied and what waits for a restart."""
        lines = []
        if self.applied:
            lines.append("applied: " + ", ".join(self.applied))
        cams = [
            ("added", [c.id for c in self.start_cameras]),
            ("removed", list(self.stop_cameras)),
            ("restarted", [c.id for c in self.restart_cameras]),
        ]
        if any(ids for _, ids in cams):
            lines.append("cameras " + "; ".join(f"{what} {', '.join(ids)}" for what, ids in cams if ids))
        if self.needs_restart:
            lines.append("needs a restart to take effect (still running the old values): " + ", ".join(self.needs_restart))
        return lines or ["nothing changed"]


def plan_reload(old: Settings, new: Settings, running_sha256: str, new_sha256: str) -> ReloadPlan:
    """Pure: the plan that takes a daemon running `old` (and the model with `running_sha256`) to `new`."""
    keys = changed_keys(old, new)
    file_changed = new_sha256 != running_sha256
    engine = file_changed or any(k in ENGINE_KEYS for k in keys)
    applied = [k for k in keys if k in _APPLIED_KEYS]
    if file_changed and "model.path" not in applied:
        applied.insert(0, "model file (new contents)")
    restart = [k for k in keys if k not in _APPLIED_KEYS]
    before = {c.id: c for c in old.cameras}
    after = {c.id: c for c in new.cameras}
    keep = {key.split(".")[0] for key in restart}
    effective = new.model_copy(update={section: getattr(old, section) for section in keep})
    for section in keep:  # a section is kept whole: apply its context keys now anyway
        for key in (k for k in applied if k.startswith(section + ".")):
            name = key.split(".", 1)[1]
            updated = getattr(effective, section).model_copy(update={name: getattr(getattr(new, section), name)})
            effective = effective.model_copy(update={section: updated})
    both = [cid for cid in after if cid in before]
    # A camera whose only changes are its option overrides keeps running: the context carries them.
    overrides = [
        f"cameras.{cid}.{k}" for cid in both for k in CAMERA_OPTION_KEYS if getattr(before[cid], k) != getattr(after[cid], k)
    ]
    return ReloadPlan(
        effective=effective,
        load_model=engine,
        swap_context=engine or any(k in CONTEXT_KEYS for k in keys) or bool(overrides),
        applied=tuple(applied + overrides),
        needs_restart=tuple(restart),
        stop_cameras=tuple(cid for cid in before if cid not in after),
        start_cameras=tuple(c for cid, c in after.items() if cid not in before),
        restart_cameras=tuple(after[cid] for cid in both if _without_options(before[cid]) != _without_options(after[cid])),
    )


def _without_options(cam: CameraConfig) -> dict:
    """A camera's config but its option overrides: what a change of restarts the camera."""
    return cam.model_dump(exclude=set(CAMERA_OPTION_KEYS))


@dataclass(frozen=True)
class PreparedReload:
    """A plan with what it needs already built: the new inference context (None: keep the running one)."""

    plan: ReloadPlan
    context: InferenceContext | None


def prepare_reload(config_path: Path, old: Settings, running: InferenceContext) -> PreparedReload:
    """Read the config, plan, and build the new context (model loaded and warmed up) if the plan says so.

    Slow (seconds for a warm-up) and fallible: runs on the reload thread, touches nothing that runs."""
    new = load_settings(config_path)
    model_path = resolve_model_path(new.model.path)
    new_sha = file_sha256(model_path) if model_path.is_file() else f"missing:{model_path}"
    plan = plan_reload(old, new, running.deployable.sha256, new_sha)
    if plan.load_model:
        context = build_context(plan.effective, load_model(model_path))
    elif plan.swap_context:
        options = inspect_options(plan.effective, running.deployable)
        context = replace(
            running,
            options=options,
            max_wait_s=plan.effective.batching.max_wait_ms / 1000.0,
            per_camera=camera_options(plan.effective, running.deployable, options),
        )
    else:
        context = None
    return PreparedReload(plan, context)
