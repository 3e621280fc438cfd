"""The inference context: everything one batch is run with, swapped by a reload as one object.

A batch holds the frames of one model's cameras; it is formed with that model's batch limit and run
with the same context's engine and options, so a reload can never pair a new engine with old options
or an old batch size. The models are `ModelRun`s (an engine each, the expensive part): a reload
builds runs only for the models that changed and assembles a new context over old and new runs.
"""

from __future__ import annotations

__all__ = [
    "InferenceContext",
    "ModelRun",
    "assemble",
    "build_context",
    "build_run",
    "inspect_options",
    "camera_options",
    "resolve_max_batch",
    "tuned_batches",
    "CAMERA_OPTION_KEYS",
]

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from inspectd.config import DEFAULT_MODEL_ID, ModelConfig, ModelEntry, Settings
from inspectd.model.deployable import Deployable
from inspectd.model.masks import MaskRule
from inspectd.pipeline import autotune
from inspectd.pipeline.batching import buckets_for
from inspectd.pipeline.engine import InferenceEngine, select_device, tune
from inspectd.pipeline.episodes import EpisodeRules
from inspectd.pipeline.postprocess import InspectOptions

log = logging.getLogger("inspectd.pipeline.context")


@dataclass(frozen=True)
class ModelRun:
    """One loaded model: its id, its engine (model + batch sizes) and its file. Built at start-up, and again by a
    reload only for the model that changed (`[[models]]`); the others' runs are reused as they are."""

    id: str
    engine: InferenceEngine
    deployable: Deployable

    @property
    def max_batch(self) -> int:
        return self.engine.buckets[-1]

    @cached_property  # asked for each frame; a run's engine never changes (a reload makes a new run)
    def model(self) -> dict:
        """The model as events name it: {"id", "name", "sha256", "runtime", "precision"}."""
        d, engine = self.deployable, self.engine
        return {"id": self.id, "name": d.name, "sha256": d.sha256, "runtime": engine.runtime, "precision": engine.precision}


@dataclass(frozen=True)
class InferenceContext:
    """The models (runs), which camera goes to which, the options that turn each model's output into Inspections,
    and the batching wait. Frozen: a change is a new context (`assemble`, `dataclasses.replace`)."""

    runs: Mapping[str, ModelRun]  # by id, in config order, shadows included; the first is the default model
    options: Mapping[str, InspectOptions]  # by model id: the options of its cameras without overrides
    max_wait_s: float = 0.01  # [batching] max_wait_ms: how long a batch waits for more frames after the first
    cameras: Mapping[str, str] = field(default_factory=dict)  # camera -> model id (a camera not here: the default)
    per_camera: Mapping[str, InspectOptions] = field(default_factory=dict)  # cameras with overrides of their own
    shadows: Mapping[str, str] = field(default_factory=dict)  # model id -> the id of its shadow model
    sample: Mapping[str, float] = field(default_factory=dict)  # shadow id -> the share of its model's frames it runs

    @classmethod
    def single(
        cls, engine: InferenceEngine, options: InspectOptions, deployable: Deployable, max_wait_s: float = 0.01
    ) -> InferenceContext:
        """One model (id "default") for every camera: tests, benchmarks."""
        return cls({DEFAULT_MODEL_ID: ModelRun(DEFAULT_MODEL_ID, engine, deployable)}, {DEFAULT_MODEL_ID: options}, max_wait_s)

    @property
    def default(self) -> ModelRun:
        return self.runs[self.production[0]]

    @property
    def production(self) -> tuple[str, ...]:
        """The ids of the models cameras' frames go to (every model but the shadows), in config order."""
        shadows = set(self.shadows.values())
        return tuple(mid for mid in self.runs if mid not in shadows)

    def model_of(self, camera: str) -> str:
        """The id of the model a camera's frames go to."""
        return self.cameras.get(camera, self.default.id)

    def run_for(self, camera: str) -> ModelRun:
        return self.runs[self.model_of(camera)]

    def options_for(self, camera: str) -> InspectOptions:
        """The options a camera's frames are inspected with: its own overrides, else its model's."""
        return self.per_camera.get(camera) or self.options[self.model_of(camera)]

    def limit(self, model_id: str) -> int:
        """The largest batch of a model's engine."""
        return self.runs[model_id].max_batch


def inspect_options(s: Settings, entry: ModelEntry, deployable: Deployable) -> InspectOptions:
    """How a model's results become Inspections, from the config, its [[models]] table and its own thresholds."""
    threshold = deployable.threshold if entry.threshold is None else entry.threshold
    return InspectOptions(
        threshold=threshold,
        mask_rule=mask_rule(entry, deployable),
        mask_resolution=s.postprocess.mask_resolution,
        min_region_px=s.postprocess.min_region_px,
        attach_frame=s.publish.attach_frame,
        jpeg_quality=s.postprocess.jpeg_quality,
        results=s.publish.results,
        archive_frame=s.archive.frame_format if s.archive.dir else "",
        archive_ok_every=s.archive.ok_every,
        episode_rules=episode_rules(s, threshold),
        episode_mode=s.episodes.mode,
    )


# A camera's keys that the context carries (a reload swaps the context, the camera keeps running).
CAMERA_OPTION_KEYS = ("model", "threshold", "mask_rule", "min_region_px")


def camera_options(s: Settings, models: Mapping[str, InspectOptions]) -> dict[str, InspectOptions]:
    """The options of each camera with overrides of its own ([[cameras]] threshold, mask_rule, min_region_px),
    on top of its model's."""
    out = {}
    for cam in s.cameras:
        if all(getattr(cam, key) is None for key in CAMERA_OPTION_KEYS if key != "model"):
            continue
        base = models[s.model_of(cam)]
        threshold = base.threshold if cam.threshold is None else cam.threshold
        out[cam.id] = replace(
            base,
            threshold=threshold,
            mask_rule=base.mask_rule if cam.mask_rule is None else MaskRule.parse(cam.mask_rule),
            min_region_px=base.min_region_px if cam.min_region_px is None else cam.min_region_px,
            episode_rules=episode_rules(s, threshold),
        )
    return out


def episode_rules(s: Settings, threshold: float) -> EpisodeRules:
    """[episodes], the exit threshold defaulting to 0.8 x the image threshold in force."""
    exit_threshold = 0.8 * threshold if s.episodes.exit_threshold is None else s.episodes.exit_threshold
    return EpisodeRules(min(exit_threshold, threshold), s.episodes.end_frames, s.episodes.end_s)


def mask_rule(entry: ModelConfig, deployable: Deployable) -> MaskRule:
    """A model's mask_rule, else its mask_threshold (a fixed probability), else the model file's own rule."""
    if entry.mask_rule is not None:
        return MaskRule.parse(entry.mask_rule)
    if entry.mask_threshold is not None:
        return MaskRule("probability", entry.mask_threshold)
    return deployable.mask_rule


def resolve_max_batch(s: Settings, device: str) -> int:
    """`max_batch = "auto"` without `runtime = "auto"` to measure it: 1 on a CPU (batching lowered CPU throughput
    where measured), 8 on a GPU."""
    if s.batching.max_batch != "auto":
        return int(s.batching.max_batch)
    return 1 if select_device(device).startswith("/CPU") else 8


TUNED_BATCHES = (1, 2, 4, 8)  # the batch sizes `auto` measures, up to the number of the model's cameras


def tuned_batches(s: Settings, entry: ModelEntry) -> tuple[int, ...]:
    """The batch sizes `runtime = "auto"` measures for a model: its `max_batch` when set, else the sizes up to the
    number of cameras feeding it (a batch takes at most one frame per camera; a shadow: its model's cameras)."""
    if s.batching.max_batch != "auto":
        return (int(s.batching.max_batch),)
    feeds = entry.shadow_of or entry.id
    cameras = sum(1 for cam in s.cameras if s.model_of(cam) == feeds)
    return tuple(b for b in TUNED_BATCHES if b <= max(1, cameras))


def build_run(s: Settings, entry: ModelEntry, deployable: Deployable) -> ModelRun:
    """A model's engine for its [[models]] table and the batching settings, warmed up (every batch size run once)
    when asked. `runtime = "auto"` measures (or reads from the cache) the runtime and, with `max_batch = "auto"`,
    the batch size."""
    cache_dir = Path(entry.cache_dir) if entry.cache_dir else None
    choice = None
    batch = resolve_max_batch(s, entry.device)
    if entry.runtime == "auto":
        choice = tune(deployable, entry.device, entry.xla, entry.precision, cache_dir, tuned_batches(s, entry))
        batch = choice.best.batch
        if entry.shadow_of is not None:  # it is handed its model's batches, whatever batch size that model measured
            batch = max(batch, *tuned_batches(s, entry))
        log.info("model %s: %s", entry.id, autotune.format_table(choice))
    engine = InferenceEngine(
        deployable,
        buckets_for(batch),
        entry.device,
        entry.xla,
        entry.precision,
        entry.runtime,
        cache_dir,
        choice=choice,
    )
    log.info(
        "model %s (%s) runs with %s at %s, batches up to %d, on %s (%s)",
        entry.id,
        deployable.name,
        engine.runtime,
        engine.precision,
        batch,
        engine.device,
        engine.runtime_reason,
    )
    if engine.gate is not None:
        log.info("model %s: precision %s passed its quality gate: %s", entry.id, engine.precision, engine.gate.get("why", ""))
    if s.daemon.warmup:
        t0 = time.monotonic()
        engine.warmup()
        log.info("model %s: warm-up of batch sizes %s took %.1f s", entry.id, engine.buckets, time.monotonic() - t0)
    return ModelRun(entry.id, engine, deployable)


def assemble(s: Settings, runs: Mapping[str, ModelRun]) -> InferenceContext:
    """The context of settings `s` with these loaded models (one per [[models]] id): cheap, no engine is built."""
    entries = {e.id: e for e in s.model_entries}
    options = {mid: inspect_options(s, entries[mid], runs[mid].deployable) for mid in entries}
    return InferenceContext(
        {mid: runs[mid] for mid in entries},
        options,
        s.batching.max_wait_ms / 1000.0,
        {cam.id: s.model_of(cam) for cam in s.cameras},
        camera_options(s, options),
        {e.shadow_of: e.id for e in entries.values() if e.shadow_of is not None},
        {e.id: e.sample for e in entries.values() if e.shadow_of is not None},
    )


def build_context(s: Settings, deployables: Mapping[str, Deployable]) -> InferenceContext:
    """Every model's engine (`deployables`: the loaded file of each [[models]] id), and the context over them."""
    return assemble(s, {e.id: build_run(s, e, deployables[e.id]) for e in s.model_entries})
