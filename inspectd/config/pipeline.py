"""[batching], [postprocess], [episodes]: how frames are batched and inference results become events."""

from __future__ import annotations

__all__ = ["BatchingConfig", "PostprocessConfig", "EpisodesConfig"]

from typing import Annotated, Literal

from pydantic import Field

from inspectd.config.base import Reload, Section, setting

E, C, R = Reload.ENGINE, Reload.CONTEXT, Reload.RESTART


class BatchingConfig(Section):
    max_batch: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = setting(
        "auto",
        reload=E,
        description="largest batch; auto = with model.runtime auto the fastest measured, up to the model's camera "
        "count (1, 2, 4 or 8), else 1 on a CPU and 8 on a GPU",
    )
    max_wait_ms: float = setting(10, reload=C, ge=0, le=1000, description="how long to wait for more frames after the first")


class PostprocessConfig(Section):
    mask_resolution: Literal["frame", "cam"] = setting("frame", reload=C, description="mask PNG at frame size or at CAM size")
    workers: int = setting(2, reload=R, ge=1, le=32, description="post-processing threads")
    min_region_px: int = setting(1, reload=C, ge=1, le=100_000_000, description="smaller connected components are ignored")
    jpeg_quality: int = setting(85, reload=C, ge=10, le=100, description="for attach_frame")


class EpisodesConfig(Section):
    mode: Literal["frames", "episode"] = setting(
        "frames",
        reload=C,
        description="frames: every defect frame is a "
        "defect event (with its episode), plus an episode.<camera> summary "
        "at the end; episode: one defect event per episode (its best frame, "
        "at the end)",
    )
    exit_threshold: float | None = setting(
        None,
        reload=C,
        ge=0,
        le=1,
        description="an episode goes on while scores stay at or above this (default: 0.8 x the image threshold)",
    )
    end_frames: int = setting(3, reload=C, ge=1, le=10_000, description="consecutive frames below exit_threshold that end it")
    end_s: float = setting(
        1.0, reload=C, gt=0, le=86400, description="seconds since its last frame at or above exit_threshold that end it"
    )
