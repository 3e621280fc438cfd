"""The inference context: everything one batch is run with, swapped by a reload as one object.

A batch is formed with the context's batch limit and run with the same context's engine and
options, so a reload can never pair a new engine with old options or an old batch size.
"""

from __future__ import annotations

__all__ = ["InferenceContext", "build_context", "inspect_options", "camera_options", "resolve_max_batch", "CAMERA_OPTION_KEYS"]

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from inspectd.config import Settings
from inspectd.model.deployable import Deployable
from inspectd.model.masks import MaskRule
from inspectd.pipeline.batching import buckets_for
from inspectd.pipeline.engine import InferenceEngine, select_device
from inspectd.pipeline.episodes import EpisodeRules
from inspectd.pipeline.postprocess import InspectOptions

log = logging.getLogger("inspectd.pipeline.context")


@dataclass(frozen=True)
class InferenceContext:
    """An engine (model + batch sizes), the options that turn its output into Inspections, the model's
    identity and the batching wait. Frozen: a change is a new context (`dataclasses.replace`)."""

    engine: InferenceEngine
    options: InspectOptions
    deployable: Deployable
    max_wait_s: float = 0.01  # [batching] max_wait_ms: how long a batch waits for more frames after the first
    per_camera: Mapping[str, InspectOptions] = field(default_factory=dict)  # cameras with overrides of their own

    def options_for(self, camera: str) -> InspectOptions:
        """The options a camera's frames are inspected with: its own overrides, else the daemon's."""
        return self.per_camera.get(camera, self.options)

    @property
    def max_batch(self) -> int:
        return self.engine.buckets[-1]

    @property
    def model(self) -> dict:
        """The model as events name it: {"name", "sha256"}."""
        return {"name": self.deployable.name, "sha256": self.deployable.sha256}


def inspect_options(s: Settings, deployable: Deployable) -> InspectOptions:
    """How inference results become Inspections, from the config and the model's own thresholds."""
    return InspectOptions(
        threshold=deployable.threshold if s.model.threshold is None else s.model.threshold,
        mask_rule=mask_rule(s, deployable),
        mask_resolution=s.postprocess.mask_resolution,
        min_region_px=s.postprocess.min_region_px,
        attach_frame=s.publish.attach_frame,
        jpeg_quality=s.postprocess.jpeg_quality,
        results=s.publish.results,
        archive_frame=s.archive.frame_format if s.archive.dir else "",
        archive_ok_every=s.archive.ok_every,
        episode_rules=episode_rules(s, deployable),
        episode_mode=s.episodes.mode,
    )


# A camera's keys that override the daemon's options (a reload swaps the context, the camera keeps running).
CAMERA_OPTION_KEYS = ("threshold", "mask_rule", "min_region_px")


def camera_options(s: Settings, deployable: Deployable, base: InspectOptions) -> dict[str, InspectOptions]:
    """The options of each camera with overrides of its own ([[cameras]] threshold, mask_rule, min_region_px)."""
    out = {}
    for cam in s.cameras:
        if all(getattr(cam, key) is None for key in CAMERA_OPTION_KEYS):
            continue
        threshold = base.threshold if cam.threshold is None else cam.threshold
        out[cam.id] = replace(
            base,
            threshold=threshold,
            mask_rule=base.mask_rule if cam.mask_rule is None else MaskRule.parse(cam.mask_rule),
            min_region_px=base.min_region_px if cam.min_region_px is None else cam.min_region_px,
            episode_rules=episode_rules(s, deployable, threshold),
        )
    return out


def episode_rules(s: Settings, deployable: Deployable, threshold: float | None = None) -> EpisodeRules:
    """[episodes], the exit threshold defaulting to 0.8 x the image threshold in force (`threshold`: a camera's)."""
    if threshold is None:
        threshold = deployable.threshold if s.model.threshold is None else s.model.threshold
    exit_threshold = 0.8 * threshold if s.episodes.exit_threshold is None else s.episodes.exit_threshold
    return EpisodeRules(min(exit_threshold, threshold), s.episodes.end_frames, s.episodes.end_s)


def mask_rule(s: Settings, deployable: Deployable) -> MaskRule:
    """[model] mask_rule, else mask_threshold (a fixed probability), else the model's own rule."""
    if s.model.mask_rule is not None:
        return MaskRule.parse(s.model.mask_rule)
    if s.model.mask_threshold is not None:
        return MaskRule("probability", s.model.mask_threshold)
    return deployable.mask_rule


def resolve_max_batch(s: Settings) -> int:
    """`max_batch = "auto"`: 1 on a CPU (batching lowers CPU throughput, measured), 8 on a GPU."""
    if s.batching.max_batch != "auto":
        return int(s.batching.max_batch)
    return 1 if select_device(s.model.device).startswith("/CPU") else 8


def build_context(s: Settings, deployable: Deployable) -> InferenceContext:
    """Engine for the model and batching settings, warmed up (every batch size run once) when asked."""
    engine = InferenceEngine(
        deployable,
        buckets_for(resolve_max_batch(s)),
        s.model.device,
        s.model.xla,
        s.model.precision,
        s.model.runtime,
        Path(s.model.cache_dir) if s.model.cache_dir else None,
    )
    log.info("model %s runs with %s on %s (%s)", deployable.name, engine.runtime, engine.device, engine.runtime_reason)
    if s.daemon.warmup:
        t0 = time.monotonic()
        engine.warmup()
        log.info("warm-up of batch sizes %s took %.1f s", engine.buckets, time.monotonic() - t0)
    options = inspect_options(s, deployable)
    return InferenceContext(engine, options, deployable, s.batching.max_wait_ms / 1000.0, camera_options(s, deployable, options))
