"""[[cameras]]: one table per camera. A reload starts, stops or restarts a camera whose table changed."""

from __future__ import annotations

__all__ = ["CameraConfig"]

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from inspectd.config.base import PathText, Section, Text
from inspectd.config.model import MODEL_ID, MaskRuleText


class CameraConfig(Section):
    id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$", description="[a-z0-9_-]+; used in topics, labels, paths")
    url: PathText | None = Field(
        None,
        description="rtsp(s)://, a video file, v4l2:///dev/videoN, dir:///images, genicam://DEVICE, synthetic://?fps=10",
    )
    pipeline: Text | None = Field(None, description="a GStreamer pipeline ending in appsink (instead of url)")
    backend: Literal["auto", "opencv", "gstreamer"] = Field("auto", description="auto | opencv | gstreamer")
    fps_limit: float = Field(0, ge=0, le=1000, description="0 = as fast as the camera")
    loop: bool = Field(True, description="files and folders start again at the end")
    roi: tuple[int, int, int, int] | None = Field(
        None,
        description="crop [x, y, w, h] in camera pixels before inference; x, y >= 0, w, h > 0 "
        "(checked against the frame at the first frame)",
    )
    resize: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] | None = Field(
        None,
        description="resize [w, h] (after roi) on the capture thread, e.g. to the model input; "
        "event coordinates are then in resized pixels",
    )
    reconnect_initial_s: float = Field(0.5, ge=0.01, le=3600, description="first reconnect delay; doubles up to reconnect_max_s")
    reconnect_max_s: float = Field(10, ge=0.01, le=3600, description="longest reconnect delay (plus up to 20 % jitter)")
    stall_timeout_s: float = Field(5, ge=0.1, le=3600, description="no frame for this long forces a reconnect")
    open_timeout_s: float = Field(
        5,
        ge=0.1,
        le=3600,
        description="OpenCV/FFmpeg: open and read timeout (GStreamer reads never block; stall_timeout_s bounds them)",
    )
    mode: Literal["stream", "parts"] = Field(
        "stream",
        description="stream: a frame may replace the one waiting (`stale`); parts: every frame is a part that gets "
        "exactly one verdict (docs/parts.md)",
    )
    part_queue: int = Field(8, ge=1, le=10_000, description="parts: parts waiting for the model at most (more: not_inspected)")
    deadline_ms: float = Field(
        1000, ge=1, le=600_000, description="parts: a part without a verdict this long after its capture is not_inspected"
    )
    not_inspected: Literal["reject", "accept"] = Field(
        "reject", description="parts: what the line does with a not_inspected part (reject: fail-safe)"
    )
    model: str | None = Field(
        None,
        pattern=MODEL_ID,
        description="the id of the [[models]] table this camera's frames go to (default: the first that is not a shadow)",
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="this camera's image-level threshold on the score (default: its model's threshold)"
    )
    mask_rule: MaskRuleText | None = Field(
        None, description="this camera's mask rule, probability:P | relative:D | quantile:Q | minmax:M (default: its model's)"
    )
    min_region_px: int | None = Field(
        None, ge=1, le=100_000_000, description="this camera's smallest region (default: [postprocess] min_region_px)"
    )

    @field_validator("roi")
    @classmethod
    def _roi(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if value is not None and (value[0] < 0 or value[1] < 0 or value[2] <= 0 or value[3] <= 0):
            raise ValueError(f"[x, y, w, h] needs x, y >= 0 and w, h > 0 (got {list(value)})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> CameraConfig:
        if (self.url is None) == (self.pipeline is None):
            raise ValueError(f"camera {self.id!r}: set exactly one of url or pipeline")
        if (self.url is not None and not self.url.strip()) or (self.pipeline is not None and not self.pipeline.strip()):
            raise ValueError(f"camera {self.id!r}: {'url' if self.url is not None else 'pipeline'} is empty")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(f"camera {self.id!r}: reconnect_max_s must be >= reconnect_initial_s")
        if self.mode == "parts" and self.fps_limit:
            raise ValueError(f'camera {self.id!r}: fps_limit must be 0 in mode = "parts" (every frame is a part)')
        if self.mode == "stream":
            set_here = sorted(k for k in ("part_queue", "deadline_ms", "not_inspected") if k in self.model_fields_set)
            if set_here:
                raise ValueError(f'camera {self.id!r}: {", ".join(set_here)} apply to mode = "parts" only')
        return self
