"""Daemon configuration: one model per TOML section, env overrides `INSPECTD_<SECTION>__<KEY>`.

Unknown keys are errors; every error names the key, the bad value and what is allowed. Relative
paths are relative to the config file. `load_settings(path)` is the one entry point.
"""

from __future__ import annotations

__all__ = [
    "ModelConfig",
    "BatchingConfig",
    "CameraConfig",
    "PostprocessConfig",
    "PublishConfig",
    "MetricsConfig",
    "ArchiveConfig",
    "DaemonConfig",
    "Settings",
    "load_settings",
    "DEFAULT_CONFIG",
    "BUILTIN_DEMO_MODEL",
    "resolve_model_path",
]

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from inspectd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/inspectd/config.toml")
BUILTIN_DEMO_MODEL = "builtin:demo"
_ASSETS = Path(__file__).resolve().parents[1] / "assets"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    path: str = Field(BUILTIN_DEMO_MODEL, description="deployable .keras model; 'builtin:demo' is the bundled demo model")
    threshold: float | None = Field(None, ge=0, le=1, description="image-level decision on the score (default: the model's)")
    mask_threshold: float | None = Field(None, ge=0, le=1, description="per-pixel threshold on sigmoid(cam_logits) "
                                         "(default: the model's)")
    device: str = Field("auto", pattern=r"^(auto|cpu|gpu:\d+)$", description="auto | cpu | gpu:N")
    precision: Literal["float32", "mixed_float16"] = Field("float32", description="mixed_float16 on GPUs with tensor cores")
    xla: bool = Field(False, description="jit_compile the inference function (slower on CPU, measured)")


class BatchingConfig(_Section):
    max_batch: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = Field(
        "auto", description="largest batch; auto = 1 on CPU (batching lowers CPU throughput), 8 on GPU")
    max_wait_ms: float = Field(10, ge=0, le=1000, description="how long to wait for more frames after the first")


class CameraConfig(_Section):
    id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$", description="[a-z0-9_-]+; used in topics, labels, paths")
    url: str | None = Field(None, description="rtsp(s)://, a video file, v4l2:///dev/videoN, dir:///images, "
                            "synthetic://?fps=10")
    pipeline: str | None = Field(None, description="a GStreamer pipeline ending in appsink (instead of url)")
    backend: Literal["auto", "opencv", "gstreamer"] = Field("auto", description="auto | opencv | gstreamer")
    fps_limit: float = Field(0, ge=0, description="0 = as fast as the camera")
    loop: bool = Field(True, description="files and folders start again at the end")
    roi: tuple[int, int, int, int] | None = Field(None, description="crop [x, y, w, h] in camera pixels before inference")
    resize: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] | None = Field(
        None, description="resize [w, h] (after roi) on the capture thread, e.g. to the model input; "
        "event coordinates are then in resized pixels")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first reconnect delay; doubles up to reconnect_max_s")
    reconnect_max_s: float = Field(10, gt=0, description="longest reconnect delay (plus up to 20 % jitter)")
    stall_timeout_s: float = Field(5, gt=0, description="no frame for this long forces a reconnect")
    open_timeout_s: float = Field(5, gt=0, description="connect/read timeout handed to the backend")

    @model_validator(mode="after")
    def _one_source(self) -> CameraConfig:
        if (self.url is None) == (self.pipeline is None):
            raise ValueError(f"camera {self.id!r}: set exactly one of url or pipeline")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(f"camera {self.id!r}: reconnect_max_s must be >= reconnect_initial_s")
        return self


class PostprocessConfig(_Section):
    mask_resolution: Literal["frame", "cam"] = Field("frame", description="mask PNG at frame size or at CAM size")
    workers: int = Field(2, ge=1, le=32, description="post-processing threads")
    min_region_px: int = Field(1, ge=1, description="smaller connected components are ignored")
    jpeg_quality: int = Field(85, ge=10, le=100, description="for attach_frame")


class PublishConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", pattern=r"^(tcp|ipc)://.+", description="ZeroMQ PUB bind endpoint")
    send_hwm: int = Field(1000, ge=1, description="messages queued per subscriber before dropping")
    heartbeat_s: float = Field(1, gt=0, description="heartbeat period")
    results: bool = Field(False, description="also publish result.<camera> for every inspected frame")
    attach_frame: bool = Field(False, description="attach a JPEG of the frame to defect events")


class MetricsConfig(_Section):
    host: str = Field("127.0.0.1", description="bind address of /metrics, /healthz, /readyz")
    port: int = Field(9108, ge=0, le=65535, description="0 = any free port")


class ArchiveConfig(_Section):
    dir: str = Field("", description="durable copy of defect events; empty = off")
    max_bytes: int = Field(0, ge=0, description="0 = unlimited")
    max_age_s: float = Field(0, ge=0, description="0 = forever")

    @field_validator("dir")
    @classmethod
    def _not_yet(cls, value: str) -> str:
        if value:
            raise ValueError("the event archive is not implemented yet; leave dir empty")
        return value


class DaemonConfig(_Section):
    shutdown_timeout_s: float = Field(10, gt=0, description="longest wait for the batch in flight at shutdown")
    warmup: bool = Field(True, description="compile every batch size before reporting ready")
    stuck_after_s: float = Field(30, gt=0, description="a stage stuck in one call this long is unhealthy: "
                                 "/healthz fails and systemd watchdog pings stop")


class Settings(BaseSettings):
    """The whole daemon configuration (mirrors config.example.toml)."""

    model_config = SettingsConfigDict(env_prefix="INSPECTD_", env_nested_delimiter="__", extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    cameras: list[CameraConfig] = Field(default_factory=list)
    postprocess: PostprocessConfig = PostprocessConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    archive: ArchiveConfig = ArchiveConfig()
    daemon: DaemonConfig = DaemonConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        ids = [c.id for c in cameras]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"camera ids must be unique; repeated: {', '.join(dupes)}")
        return cameras

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment over the file (handed in as init kwargs by load_settings).
        return env_settings, init_settings


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    return f"{key}: {err['msg']}{shown}"


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _relative_to(base: Path, value: str) -> str:
    if not value or value.startswith(BUILTIN_DEMO_MODEL) or "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths in the file are relative to the file (not to the daemon's working directory)."""
    data = dict(data)
    for section, key in (("model", "path"), ("archive", "dir")):
        if isinstance(data.get(section), dict) and isinstance(data[section].get(key), str):
            data[section] = {**data[section], key: _relative_to(base, data[section][key])}
    cams = data.get("cameras")
    if isinstance(cams, list):
        data["cameras"] = [
            {**c, "url": _relative_to(base, c["url"])} if isinstance(c, dict) and isinstance(c.get("url"), str) else c
            for c in cams
        ]
    return data


def load_settings(path: Path | None) -> Settings:
    """Read the TOML file (None: defaults only), apply INSPECTD_* env overrides, validate."""
    data = _resolve_paths(_read_toml(path), path.resolve().parent) if path is not None else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + "; ".join(_describe(e) for e in exc.errors(include_url=False))) from None


def resolve_model_path(path: str) -> Path:
    """'builtin:demo' -> the bundled demo model; anything else is a file path."""
    if path == BUILTIN_DEMO_MODEL:
        return _ASSETS / "demo.keras"
    return Path(os.path.expanduser(path))
