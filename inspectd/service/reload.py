"""SIGHUP (`systemctl reload inspectd`) as a plan: what changed, and what each change needs.

`plan_reload(old, new, running_sha256, new_sha256)` is a pure function from the running settings,
the new settings and the model files' hashes (by model id) to a `ReloadPlan`: load the models that
changed (a new engine each; the others keep theirs), swap the inference context, stop / start /
restart cameras, and the keys that only a restart can apply. `prepare_reload` does the slow and
fallible part on the reload thread (read and validate the config, hash the model files, load and
warm up new engines beside the running ones);
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
    "model_hashes",
    "ENGINE_KEYS",
    "CONTEXT_KEYS",
    "LIVE_KEYS",
    "RESTART_KEYS",
]

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inspectd.config import CameraConfig, Reload, Settings, load_settings, reload_table
from inspectd.model.deployable import load_model, model_revision, resolve_model_path
from inspectd.pipeline.context import CAMERA_OPTION_KEYS, InferenceContext, assemble, build_run

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


_MODEL_SECTIONS = ("model", "models")  # compared model by model (`_model_changes`), not key by key


def _flatten(settings: Settings) -> dict[str, object]:
    """{"section.key": value} for every key outside [[cameras]] and the models."""
    dumped = settings.model_dump(mode="json", exclude={"cameras", *_MODEL_SECTIONS})
    return {f"{section}.{key}": value for section, values in dumped.items() for key, value in values.items()}


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys (outside [[cameras]] and the models) whose value differs, in config order."""
    a, b = _flatten(old), _flatten(new)
    return [key for key in b if a.get(key) != b[key]]


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does. `effective` is the settings the daemon runs with afterwards: the new ones,
    except the sections whose changes need a restart, which keep their running values."""

    effective: Settings
    load_models: tuple[str, ...]  # model ids that get a new engine: new, file changed, or an engine key changed
    swap_context: bool  # a new inference context (new engines, or new thresholds / output options / wait / models)
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


def _model_changes(
    old: Settings, new: Settings, running_sha256: Mapping[str, str], new_sha256: Mapping[str, str], all_engines: bool
) -> tuple[list[str], list[str]]:
    """Model by model: (the ids that need a new engine, the changes applied as named in the log). A model is named
    `model` in the short form, `models.ID` with [[models]] tables."""
    before = {e.id: e for e in old.model_entries}
    after = {e.id: e for e in new.model_entries}
    name = (lambda mid: f"models.{mid}") if new.models else (lambda mid: "model")
    load, applied = [], []
    for mid, entry in after.items():
        if mid not in before:
            load.append(mid)
            applied.append(f"{name(mid)} (added)")
            continue
        keys = [k for k in entry.model_dump() if getattr(before[mid], k) != getattr(entry, k)]
        file_changed = new_sha256.get(mid) != running_sha256.get(mid)
        applied += [f"{name(mid)}.{k}" for k in keys]
        if file_changed and "path" not in keys:
            applied.append(f"{name(mid)} file (new contents)")
        if all_engines or file_changed or any(f"model.{k}" in ENGINE_KEYS for k in keys):
            load.append(mid)
    applied += [f"models.{mid} (removed)" for mid in before if mid not in after]
    if [m for m in before if m in after] != [m for m in after if m in before]:
        applied.append("models (order: the first is the default)")
    return load, applied


def plan_reload(old: Settings, new: Settings, running_sha256: Mapping[str, str], new_sha256: Mapping[str, str]) -> ReloadPlan:
    """Pure: the plan that takes a daemon running `old` (its models' files with `running_sha256`, by model id) to
    `new` (`new_sha256`: the files the new config names, by model id). Only the models that changed get a new
    engine; the others keep theirs, and no camera restarts for a model's change."""
    keys = changed_keys(old, new)
    load, model_applied = _model_changes(old, new, running_sha256, new_sha256, any(k in ENGINE_KEYS for k in keys))
    applied = model_applied + [k for k in keys if k in _APPLIED_KEYS]
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
    # A camera whose only changes are what the context carries (its model, its option overrides) keeps running.
    overrides = [
        f"cameras.{cid}.{k}" for cid in both for k in CAMERA_OPTION_KEYS if getattr(before[cid], k) != getattr(after[cid], k)
    ]
    return ReloadPlan(
        effective=effective,
        load_models=tuple(load),
        # A camera added or removed changes the context too: which model its frames go to, its overrides.
        swap_context=bool(load or model_applied or overrides or set(before) != set(after))
        or any(k in CONTEXT_KEYS for k in keys),
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


def model_hashes(settings: Settings) -> dict[str, str]:
    """Each model's revision (a .keras file's sha256, an exported folder's manifest's), by model id ("missing:PATH"
    for a file that is not there)."""
    out = {}
    for entry in settings.model_entries:
        path = resolve_model_path(entry.path)
        out[entry.id] = model_revision(path) if path.exists() else f"missing:{path}"
    return out


def prepare_reload(config_path: Path, old: Settings, running: InferenceContext) -> PreparedReload:
    """Read the config, plan, and build engines (loaded and warmed up) for the models the plan says; the others
    keep their running engines.

    Slow (seconds for a warm-up) and fallible: runs on the reload thread, touches nothing that runs."""
    new = load_settings(config_path)
    running_sha = {mid: run.deployable.revision for mid, run in running.runs.items()}
    plan = plan_reload(old, new, running_sha, model_hashes(new))
    if not plan.swap_context:
        return PreparedReload(plan, None)
    entries = {e.id: e for e in plan.effective.model_entries}
    runs = {mid: run for mid, run in running.runs.items() if mid in entries and mid not in plan.load_models}
    for mid in plan.load_models:
        runs[mid] = build_run(plan.effective, entries[mid], load_model(resolve_model_path(entries[mid].path)))
    return PreparedReload(plan, assemble(plan.effective, runs))
