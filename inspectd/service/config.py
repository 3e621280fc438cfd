"""Daemon configuration: one model per TOML section, env overrides `INSPECTD_<SECTION>__<KEY>`.

Unknown keys are errors; every error names the key (or the INSPECTD_* variable it came from), the
bad value and what is allowed, in one line. Relative paths are relative to the config file.
`load_settings(path)` is the one entry point: it also refuses a config without cameras and warns
about INSPECTD_* variables that set nothing.
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
    "config_env_names",
    "NON_CONFIG_ENV",
    "check_model",
    "check_security",
    "load_toml_model",
    "CurveServerConfig",
    "WebServerConfig",
    "UiConfig",
    "together",
]

import difflib
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import typing
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from inspectd.errors import ConfigError, ModelFileError, NoInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("inspectd.config")

DEFAULT_CONFIG = Path("/etc/inspectd/config.toml")
BUILTIN_DEMO_MODEL = "builtin:demo"
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
ENV_PREFIX = "INSPECTD_"
# INSPECTD_* variables that are not configuration: read by inspectd itself, its tests or its scripts.
NON_CONFIG_ENV = frozenset({
    "INSPECTD_DEBUG",  # cli.py: tracebacks instead of one-line internal errors
    "INSPECTD_TEST_FREEZE_INFERENCE",  # pipeline/core.py: test hook that blocks inference
    "INSPECTD_VENV",  # scripts/*.sh: the virtual environment
    "INSPECTD_APT_PACKAGES",  # scripts/bootstrap.sh
    "INSPECTD_PIP_ARGS",  # deploy/install.sh
})
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_IPC_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _resolves(host: str) -> None:
    """ValueError unless `host` is an IP address literal or a name this machine resolves."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError("not an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0 for every interface, "
                         "or a name of this machine)")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host name {host!r}: {getattr(exc, 'strerror', None) or exc}") from None


def _interfaces() -> set[str]:
    """Network interface names of this machine (ZeroMQ binds tcp://eth0:PORT to eth0's address)."""
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


def _check_tcp_endpoint(rest: str) -> None:
    """tcp://HOST:PORT as ZeroMQ binds it: HOST is *, an IPv4 address, an interface or host name."""
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError("expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5556 or tcp://*:5556")
    if port != "*" and not (re.fullmatch(r"[0-9]{1,5}", port) and int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a TCP port: 1-65535, or 0 or * for any free port")
    if host == "*":
        return
    if host.startswith("[") or ":" in host:
        raise ValueError("IPv6 addresses are not enabled on the publisher socket; use an IPv4 address, "
                         "* (every interface) or an interface name")
    if host in _interfaces():
        return
    _resolves(host)


def _check_endpoint(value: str) -> str:
    """A ZeroMQ bind endpoint: tcp://HOST:PORT or ipc://PATH, checked before anything binds."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ValueError("expected tcp://HOST:PORT or ipc://PATH")
    if scheme == "tcp":
        _check_tcp_endpoint(rest)
    elif not rest or "\x00" in rest or len(rest.encode("utf-8", "surrogatepass")) > _IPC_PATH_MAX:
        raise ValueError(f"ipc path must be 1-{_IPC_PATH_MAX} bytes without NUL, e.g. ipc:///run/inspectd/events")
    return value


_Path = Annotated[str, AfterValidator(_no_nul)]  # a file or folder path: any text but NUL


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def together(section: str, model: BaseModel, first: str, second: str, why: str) -> None:
    """ValueError unless the two string keys are both set or both empty (a key pair, a certificate and its key)."""
    if bool(getattr(model, first)) != bool(getattr(model, second)):
        raise ValueError(f"set {section}.{first} and {section}.{second} together ({why}), or neither")


class ModelConfig(_Section):
    path: str = Field(BUILTIN_DEMO_MODEL, description="deployable .keras model; 'builtin:demo' is the bundled demo model")
    threshold: float | None = Field(None, ge=0, le=1, description="image-level decision on the score (default: the model's)")
    mask_threshold: float | None = Field(None, ge=0, le=1, description="a fixed per-pixel threshold on "
                                         "sigmoid(cam_logits), i.e. mask_rule probability:VALUE (default: the model's rule)")
    mask_rule: str | None = Field(None, description="how the map becomes a mask: probability:P | relative:D | "
                                  "quantile:Q | minmax:M (default: the model's own rule; see docs/model.md)")
    device: str = Field("auto", pattern=r"^(auto|cpu|gpu:\d+)$", description="auto | cpu | gpu:N")
    precision: Literal["float32", "mixed_float16"] = Field("float32", description="mixed_float16 on GPUs with tensor cores")
    xla: bool = Field(False, description="jit_compile the model (the resize before it stays outside; slower on CPU, measured)")
    runtime: Literal["auto", "tensorflow", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs the model: auto = the fastest installed for the device (on a CPU onnxruntime, "
        "then openvino, else tensorflow; on a GPU, or with precision/xla set, tensorflow); the .keras file is "
        "converted once and cached")
    cache_dir: str = Field("", description="where converted models are kept (default: systemd's CacheDirectory, "
                           "else ~/.cache/inspectd)")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _no_nul(value)

    @field_validator("mask_rule")
    @classmethod
    def _mask_rule(cls, value: str | None) -> str | None:
        if value is not None:
            from inspectd.pipeline.masks import MaskRule

            MaskRule.parse(value)
        return value

    @model_validator(mode="after")
    def _one_mask_setting(self) -> ModelConfig:
        if self.mask_rule is not None and self.mask_threshold is not None:
            raise ValueError("set model.mask_rule or model.mask_threshold (= mask_rule probability:VALUE), not both")
        return self


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
    roi: tuple[int, int, int, int] | None = Field(
        None, description="crop [x, y, w, h] in camera pixels before inference; x, y >= 0, w, h > 0 "
        "(checked against the frame at the first frame)")
    resize: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] | None = Field(
        None, description="resize [w, h] (after roi) on the capture thread, e.g. to the model input; "
        "event coordinates are then in resized pixels")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first reconnect delay; doubles up to reconnect_max_s")
    reconnect_max_s: float = Field(10, gt=0, description="longest reconnect delay (plus up to 20 % jitter)")
    stall_timeout_s: float = Field(5, gt=0, description="no frame for this long forces a reconnect")
    open_timeout_s: float = Field(5, gt=0, description="OpenCV/FFmpeg: open and read timeout (GStreamer reads "
                                  "never block; stall_timeout_s bounds them)")

    @field_validator("url", "pipeline")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return value if value is None else _no_nul(value)

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
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(f"camera {self.id!r}: reconnect_max_s must be >= reconnect_initial_s")
        return self


class PostprocessConfig(_Section):
    mask_resolution: Literal["frame", "cam"] = Field("frame", description="mask PNG at frame size or at CAM size")
    workers: int = Field(2, ge=1, le=32, description="post-processing threads")
    min_region_px: int = Field(1, ge=1, description="smaller connected components are ignored")
    jpeg_quality: int = Field(85, ge=10, le=100, description="for attach_frame")


class CurveServerConfig(_Section):
    """The CURVE keys of a process that binds (the daemon's [publish], the proxy's [proxy])."""

    curve_secret_key: str = Field("", description="this process's CURVE secret key file (inspectd keys generate; mode "
                                  "0600): encrypts and authenticates every socket it binds; with curve_clients. "
                                  "Empty = plain text (docs/security.md)")
    curve_clients: str = Field("", description="folder of the public key files (*.key) of the clients allowed to "
                               "connect; read again when it changes")

    @field_validator("curve_secret_key", "curve_clients")
    @classmethod
    def _key_path(cls, value: str) -> str:
        return _no_nul(value)

    @model_validator(mode="after")
    def _both_keys(self) -> CurveServerConfig:
        section = "publish" if isinstance(self, PublishConfig) else "proxy"
        together(section, self, "curve_secret_key", "curve_clients",
                 "CURVE needs the key pair and the clients it allows; neither = plain text")
        return self


class PublishConfig(CurveServerConfig):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB bind endpoint: tcp://HOST:PORT "
                          "(HOST *, an IPv4 address, interface or host name; PORT 1-65535, 0 or * = any) or ipc://PATH")
    send_hwm: int = Field(100, ge=1, le=100_000, description="messages queued per subscriber (ZeroMQ SNDHWM) and in "
                          "the hand-off to the publisher thread before new ones are dropped; bounds memory, see "
                          "docs/daemon.md")
    heartbeat_s: float = Field(1, gt=0, description="heartbeat period")
    results: bool = Field(False, description="also publish result.<camera> for every inspected frame")
    attach_frame: bool = Field(False, description="attach a JPEG of the frame to defect events")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint(value)



class WebServerConfig(_Section):
    """An HTTP endpoint of the daemon ([metrics], [ui]): bind address, optional HTTPS and basic auth."""

    _section: ClassVar[str] = "metrics"
    host: str = Field("127.0.0.1", description="bind address of /metrics, /healthz, /readyz")
    port: int = Field(9108, ge=0, le=65535, description="0 = any free port")
    tls_cert_file: str = Field("", description="PEM certificate (chain) to serve HTTPS with; with tls_key_file. "
                               "Empty = plain HTTP")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file (mode 0600)")
    basic_auth_users: dict[str, str] = Field(default_factory=dict, description="user = bcrypt hash (inspectd keys "
                                             "hash-password); every request then needs one of them. Empty = no auth")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value:
            raise ValueError("empty; use 0.0.0.0 (or ::) for every interface")
        _resolves(value)
        return value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _path(cls, value: str) -> str:
        return _no_nul(value)

    @field_validator("basic_auth_users")
    @classmethod
    def _users(cls, value: dict[str, str]) -> dict[str, str]:
        for user, hashed in value.items():
            if not user or ":" in user or not user.isprintable():
                raise ValueError(f"user {user!r}: a printable name without ':' expected")
            if not re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", hashed):
                raise ValueError(f"user {user!r}: not a bcrypt hash ($2b$12$... from inspectd keys hash-password)")
            if not 4 <= int(hashed[4:6]) <= 15:  # beyond 15 every check takes seconds: make a new hash
                raise ValueError(f"user {user!r}: bcrypt cost {int(hashed[4:6])}: 4-15 expected (12 is usual)")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> WebServerConfig:
        together(self._section, self, "tls_cert_file", "tls_key_file", "a certificate and its key; neither = plain HTTP")
        return self


class MetricsConfig(WebServerConfig):
    pass


class UiConfig(WebServerConfig):
    """[ui]: the operator's live view (docs/live-view.md)."""

    _section: ClassVar[str] = "ui"
    enabled: bool = Field(False, description="serve the live view; off by default so that an upgrade never opens a "
                          "port a running line did not ask for")
    host: str = Field("127.0.0.1", description="bind address of the live view; any other than loopback needs "
                      "ui.basic_auth_users")
    port: int = Field(8080, ge=0, le=65535, description="0 = any free port")
    max_fps: float = Field(5.0, gt=0, le=30, description="live images per second per camera, at most (rendered only "
                           "while someone watches)")
    width: int = Field(640, ge=64, le=4096, description="live images are scaled down to this width at most")
    recent: int = Field(50, ge=1, le=1000, description="recent defects listed (archive off: kept in memory)")
    recent_bytes: int = Field(64_000_000, ge=1_000_000, description="memory for the recent defects' frames when the "
                              "archive is off (the oldest go first)")
    collect_dir: _Path = Field("", description="folder the 'save as ok / defect' buttons write frames to (DIR/ok, "
                             "DIR/defect: the layout `inspectd train` reads); empty = no buttons")

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> UiConfig:
        from inspectd.security import is_loopback_endpoint

        if self.enabled and not self.basic_auth_users and not is_loopback_endpoint(f"tcp://{self.host}:{self.port}"):
            raise ValueError(f"ui.host {self.host!r} is reachable from the network: set ui.basic_auth_users (and "
                             "ui.tls_cert_file / ui.tls_key_file), or keep ui.host on 127.0.0.1 and use an SSH tunnel")
        return self


class ReplayConfig(_Section):
    endpoint: str = Field("", description="ZeroMQ ROUTER bind endpoint of the replay service (docs/wire-format.md"
                          "#replay), e.g. tcp://127.0.0.1:5557; empty = off")
    ring_messages: int = Field(1000, ge=1, le=1_000_000, description="messages kept in memory for replay")
    ring_bytes: int = Field(64_000_000, ge=1_000, description="bytes kept in memory for replay")
    max_messages: int = Field(1000, ge=1, le=100_000, description="messages in one answer (then `partial`)")
    max_bytes: int = Field(64_000_000, ge=1_000, description="bytes in one answer (then `partial`)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint(value) if value else value


class ArchiveConfig(_Section):
    dir: str = Field("", description="folder of the durable copy of every defect event (docs/archive.md); "
                     "empty = off")
    max_bytes: int = Field(10_000_000_000, ge=0, description="the oldest entries go beyond this many bytes; 0 = no limit")
    max_age_s: float = Field(30 * 86400, ge=0, description="entries older than this go; 0 = kept forever")
    frame_format: Literal["jpeg", "png"] = Field("jpeg", description="the frame kept with each entry; png is "
                                                 "lossless (for retraining), about 10x larger")
    ok_every: int = Field(0, ge=0, description="also keep ok frames whose frame_seq is a multiple of this "
                          "(negatives for retraining); 0 = defects only")
    queue_size: int = Field(256, ge=1, le=100_000, description="entries waiting for the disk before new ones "
                            "are dropped (counted); bounds memory")

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str) -> str:
        return _no_nul(value)


class EpisodesConfig(_Section):
    mode: Literal["frames", "episode"] = Field("frames", description="frames: every defect frame is a defect event "
                                               "(with its episode), plus an episode.<camera> summary at the end; "
                                               "episode: one defect event per episode (its best frame, at the end)")
    exit_threshold: float | None = Field(None, ge=0, le=1, description="an episode goes on while scores stay at or "
                                         "above this (default: 0.8 x the image threshold)")
    end_frames: int = Field(3, ge=1, le=10_000, description="consecutive frames below exit_threshold that end it")
    end_s: float = Field(1.0, gt=0, description="seconds since its last frame at or above exit_threshold that end it")


class DaemonConfig(_Section):
    shutdown_timeout_s: float = Field(10, gt=0, description="longest wait for the batch in flight at shutdown")
    warmup: bool = Field(True, description="compile every batch size before reporting ready")
    stuck_after_s: float = Field(30, gt=0, description="a stage stuck in one call this long is unhealthy: "
                                 "/healthz fails and systemd watchdog pings stop")


class Settings(BaseSettings):
    """The whole daemon configuration (mirrors config.example.toml).

    Constructible in code with any cameras (tests, bench); `load_settings` adds the checks of a
    config the daemon runs: at least one camera, errors attributed to the file or a variable.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    cameras: list[CameraConfig] = Field(default_factory=list, description="one [[cameras]] table per camera; "
                                        "load_settings requires at least one")
    postprocess: PostprocessConfig = PostprocessConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    episodes: EpisodesConfig = EpisodesConfig()
    replay: ReplayConfig = ReplayConfig()
    archive: ArchiveConfig = ArchiveConfig()
    ui: UiConfig = UiConfig()
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


def config_env_names() -> list[str]:
    """Every INSPECTD_* variable that sets configuration: a whole section as JSON, or one key of it."""
    names = []
    for section, field in Settings.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in field.annotation.model_fields]
    return names


def _config_env() -> dict[str, str]:
    """The INSPECTD_* configuration variables that are set, by upper-case name (they match case-insensitively)."""
    return {k.upper(): v for k, v in os.environ.items()
            if k.upper().startswith(ENV_PREFIX) and k.upper() not in NON_CONFIG_ENV}


def _env_path(name: str) -> tuple[str, ...]:
    """INSPECTD_MODEL__THRESHOLD -> ("model", "threshold"), as pydantic-settings splits it."""
    return tuple(name[len(ENV_PREFIX):].lower().split("__"))


def _closest(word: str, candidates: list[str], prefix: str = "") -> str:
    """"; did you mean PREFIX+CANDIDATE?" for the closest candidate, or "" if none is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _warn_unknown_env(env: dict[str, str]) -> None:
    """A variable whose section does not exist is ignored by pydantic-settings: say so, with the closest name."""
    for name in sorted(env):
        if _env_path(name)[0] not in Settings.model_fields:
            hint = _closest(name, config_env_names() + sorted(NON_CONFIG_ENV)) or \
                "; configuration variables are INSPECTD_<SECTION>__<KEY>"
            log.warning("%s is not an inspectd variable and is ignored%s", name, hint)


def _check_env_json(env: dict[str, str]) -> None:
    """INSPECTD_<SECTION> and INSPECTD_CAMERAS hold JSON: a ConfigError naming the variable if they do not."""
    for section in Settings.model_fields:
        name = f"{ENV_PREFIX}{section.upper()}"
        if name not in env:
            continue
        try:
            json.loads(env[name])
        except ValueError as exc:
            want = ('a JSON list of camera tables, e.g. [{"id": "cam1", "url": "rtsp://..."}]' if section == "cameras"
                    else f"a JSON object of [{section}] keys (or set one key as {name}__KEY)")
            raise ConfigError(f"{name}: not valid JSON ({getattr(exc, 'msg', exc)}); expected {want}") from None


def _sets(name: str, value: str, loc: tuple) -> bool:
    """Whether variable `name` (= `value`) supplied the value at `loc` (keys and list indexes)."""
    path, parts = _env_path(name), tuple(str(p).lower() for p in loc)
    n = min(len(path), len(parts))
    if path[:n] != parts[:n]:
        return False
    if len(path) >= len(parts):
        return True
    try:  # a whole section or the camera list as JSON: does it hold the rest of loc?
        node = json.loads(value)
    except ValueError:
        return False
    for part in loc[len(path):]:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def _origin(loc: tuple, env: dict[str, str]) -> str | None:
    """The most specific INSPECTD_* variable that supplied the value at `loc`, or None (it came from the file)."""
    names = sorted((n for n in env if _sets(n, env[n], loc)), key=lambda n: -len(_env_path(n)))
    return names[0] if names else None


def _keys_at(loc: tuple, root: type[BaseModel] | None = None) -> list[str]:
    """The keys allowed at `loc` (a path of keys and list indexes into `root`, default Settings); [] if unknown."""
    model: type[BaseModel] = root or Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _redact(text: str) -> str:
    """scheme://user:password@host -> scheme://user:***@host (camera URLs in error messages)."""
    return re.sub(r"(://[^:@/\s]*):[^@\s]*@", r"\1:***@", text)


def _describe(err: dict, origin: str | None, root: type[BaseModel] | None = None) -> str:
    loc = err["loc"]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        if origin is not None and _env_path(origin) == tuple(str(p).lower() for p in loc):
            return f"{key}: unknown key{_closest(origin, config_env_names())}"
        parent = "".join(f"{p}." for p in loc[:-1])
        return f"{key}: unknown key{_closest(str(loc[-1]), _keys_at(loc[:-1], root), parent)}"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list | tuple) else f" (got {_redact(repr(value))[:120]})"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"


def _format_errors(errors: list[dict], env: dict[str, str], where: str, root: type[BaseModel] | None = None) -> str:
    """One line: the errors grouped by where each value came from (the file, or an INSPECTD_* variable)."""
    groups: dict[str, list[str]] = {}
    for err in errors:
        origin = _origin(err["loc"], env)
        groups.setdefault(origin or where, []).append(_describe(err, origin, root))
    return "; ".join(f"{src}: {'; '.join(msgs)}" if src else "; ".join(msgs) for src, msgs in groups.items())


def load_toml_model(path: Path, model: type[BaseModel], paths: tuple[tuple[str, ...], ...] = ()) -> BaseModel:
    """A TOML file validated into `model` (no environment overrides): the daemon's errors, in one line naming
    the key (ConfigError). `paths`: keys (as paths into the file) whose relative paths are relative to it."""
    data = _read_toml(path)
    base = path.resolve().parent

    def resolve(node, keys: tuple[str, ...]) -> None:  # "*" steps into every element of a list
        if not keys:
            return
        if keys[0] == "*":
            for item in node if isinstance(node, list) else ():
                resolve(item, keys[1:])
        elif isinstance(node, dict) and len(keys) == 1 and isinstance(node.get(keys[0]), str):
            node[keys[0]] = _relative_to(base, node[keys[0]])
        elif isinstance(node, dict):
            resolve(node.get(keys[0]), keys[1:])

    for keys in paths:
        resolve(data, keys)
    try:
        return model(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors(include_url=False), {}, str(path), model)) from None


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}, offset "
                          f"{exc.start}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _relative_to(base: Path, value: str) -> str:
    if not value or value.startswith(BUILTIN_DEMO_MODEL) or "://" in value or "\x00" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths in the file are relative to the file (not to the daemon's working directory)."""
    data = dict(data)
    for section, key in (("model", "path"), ("archive", "dir"), ("publish", "curve_secret_key"),
                         ("publish", "curve_clients"), ("metrics", "tls_cert_file"), ("metrics", "tls_key_file"),
                         ("ui", "tls_cert_file"), ("ui", "tls_key_file"), ("ui", "collect_dir")):
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
    """Read the TOML file (None: defaults only), apply INSPECTD_* env overrides, validate; ConfigError in one line."""
    data = _resolve_paths(_read_toml(path), path.resolve().parent) if path is not None else {}
    where = str(path) if path is not None else ""
    prefix = f"{where}: " if where else ""
    private = sorted(k for k in data if k.startswith("_"))  # BaseSettings would take these as its own options
    if private:
        raise ConfigError(prefix + "; ".join(f"{k}: unknown key" for k in private))
    env = _config_env()
    _warn_unknown_env(env)
    _check_env_json(env)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors(include_url=False), env, where)) from None
    except SettingsError as exc:  # a variable pydantic-settings cannot parse (the JSON ones are checked above)
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{found[1].upper()}" if found else f"{ENV_PREFIX}*"
        raise ConfigError(f"{name}: cannot parse the value: {exc}") from None
    if path is not None:
        from inspectd.security import check_config_file

        check_config_file(path, holds_secrets=_holds_passwords(data))
    if not settings.cameras:
        origin = _origin(("cameras",), env)
        raise ConfigError((f"{origin}: " if origin else prefix) +
                          "cameras: no [[cameras]] configured; the daemon needs at least one camera")
    return settings


_PASSWORD_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # scheme://user:password@host


def _holds_passwords(data: dict) -> bool:
    """The file (not the environment) has a camera URL or pipeline with a password in it
    (rtsp://user:pass@..., rtspsrc user-pw=...)."""
    cams = data.get("cameras") if isinstance(data.get("cameras"), list) else []
    texts = [v for c in cams if isinstance(c, dict) for k, v in c.items() if k in ("url", "pipeline") and isinstance(v, str)]
    return any(_PASSWORD_IN_URL.search(t) or "user-pw=" in t for t in texts)


def check_security(settings: Settings) -> None:
    """Load the key files and the certificate the daemon would (ConfigError naming the key): a secret file
    others can read, a file that is not a key, a certificate that does not match its key."""
    from inspectd.security import ServerKeys
    from inspectd.service.web import web_security

    if settings.publish.curve_secret_key:
        ServerKeys.load(settings.publish.curve_secret_key, settings.publish.curve_clients)
    web_security(settings.metrics, "metrics")
    if settings.ui.enabled:
        web_security(settings.ui, "ui")


def resolve_model_path(path: str) -> Path:
    """'builtin:demo' -> the bundled demo model; anything else is a file path."""
    if path == BUILTIN_DEMO_MODEL:
        return _ASSETS / "demo.keras"
    return Path(os.path.expanduser(path))


def check_model(cfg: ModelConfig) -> list[str]:
    """Load the configured model as the daemon would (safe mode) and describe it; the daemon's exit codes on failure.

    NoInputError (66) for a missing file, ModelFileError (65) for anything that is not a deployable
    model. The metadata is read first, so a bad path fails before TensorFlow is imported.
    """
    from inspectd.model.deployable import load_model, read_metadata

    path = resolve_model_path(cfg.path)
    try:
        read_metadata(path)
        from inspectd.tfload import import_tensorflow

        import_tensorflow()
        model = load_model(path)
    except (NoInputError, ModelFileError) as exc:  # the same error and exit code as `run`, naming the key
        raise type(exc)(f"model.path: {exc}") from None
    outputs = model.model.output if isinstance(model.model.output, dict) else {}
    missing = sorted({"score", "cam_logits"} - set(outputs))
    if missing:
        raise ModelFileError(f"{path}: the model has no output {', '.join(missing)}; not an inspectd deployable model")
    shapes = ", ".join(f"{name} [{', '.join('B' if d is None else str(d) for d in outputs[name].shape)}]"
                       for name in ("score", "cam_logits"))
    width, height = model.input_size
    thresholds = ", ".join(
        f"{what} {own}" if mine is None else f"{what} {mine} ({key}; the model's {own})"
        for what, key, mine, own in (("score", "model.threshold", cfg.threshold, model.threshold),
                                     ("mask rule", "model.mask_rule", cfg.mask_rule or (
                                         None if cfg.mask_threshold is None else f"probability:{cfg.mask_threshold:g}"),
                                      model.mask_rule)))
    return [f"model {cfg.path}: {path} (loaded in Keras safe mode)",
            f"  name {model.name}, backbone {model.meta.get('backbone', 'unknown')}, input {width}x{height} RGB 0..255",
            f"  outputs {shapes}, pooling {model.pooling}",
            f"  thresholds {thresholds}",
            f"  sha256 {model.sha256[:16]}"]
