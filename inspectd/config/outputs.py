"""[publish], [replay], [archive], [metrics], [ui]: where events, copies of them and measurements go."""

from __future__ import annotations

__all__ = ["CurveServerConfig", "PublishConfig", "ReplayConfig", "ArchiveConfig", "WebServerConfig", "MetricsConfig", "UiConfig"]

import re
from typing import ClassVar, Literal

from pydantic import field_validator, model_validator

from inspectd.config.base import Endpoint, OptionalEndpoint, PathText, Reload, Section, check_host, setting, together
from inspectd.security import is_loopback_endpoint

C, R = Reload.CONTEXT, Reload.RESTART


class CurveServerConfig(Section):
    """The CURVE keys of a process that binds (the daemon's [publish], the proxy's [proxy])."""

    _section: ClassVar[str] = "proxy"
    curve_secret_key: PathText = setting(
        "",
        reload=R,
        description="this process's CURVE secret key file (inspectd "
        "keys generate; mode 0600): encrypts and authenticates every socket it "
        "binds; with curve_clients. Empty = plain text (docs/security.md)",
    )
    curve_clients: PathText = setting(
        "",
        reload=R,
        description="folder of the public key files (*.key) of the clients allowed to connect; read again when it changes",
    )

    @model_validator(mode="after")
    def _both_keys(self) -> CurveServerConfig:
        together(
            self._section,
            self,
            "curve_secret_key",
            "curve_clients",
            "CURVE needs the key pair and the clients it allows; neither = plain text",
        )
        return self


class PublishConfig(CurveServerConfig):
    _section: ClassVar[str] = "publish"
    endpoint: Endpoint = setting(
        "tcp://127.0.0.1:5556",
        reload=R,
        description="ZeroMQ PUB bind endpoint: "
        "tcp://HOST:PORT (HOST *, an IPv4 address, interface or host name; PORT 1-65535, 0 "
        "or * = any) or ipc://PATH",
    )
    send_hwm: int = setting(
        100,
        reload=R,
        ge=1,
        le=100_000,
        description="messages queued per subscriber (ZeroMQ "
        "SNDHWM) and in the hand-off to the publisher thread before new ones are dropped; bounds "
        "memory, see docs/daemon.md",
    )
    heartbeat_s: float = setting(1, reload=R, ge=0.01, le=3600, description="heartbeat period")
    results: bool = setting(False, reload=C, description="also publish result.<camera> for every inspected frame")
    attach_frame: bool = setting(False, reload=C, description="attach a JPEG of the frame to defect events")


class ReplayConfig(Section):
    endpoint: OptionalEndpoint = setting(
        "",
        reload=R,
        description="ZeroMQ ROUTER bind endpoint of the replay "
        "service (docs/wire-format.md#replay), e.g. tcp://127.0.0.1:5557; empty = off",
    )
    ring_messages: int = setting(1000, reload=R, ge=1, le=1_000_000, description="messages kept in memory for replay")
    ring_bytes: int = setting(64_000_000, reload=R, ge=1_000, le=16_000_000_000, description="bytes kept in memory for replay")
    max_messages: int = setting(1000, reload=R, ge=1, le=100_000, description="messages in one answer (then `partial`)")
    max_bytes: int = setting(64_000_000, reload=R, ge=1_000, le=4_000_000_000, description="bytes in one answer (then `partial`)")
    peer_queue: int = setting(
        16,
        reload=R,
        ge=1,
        le=10_000,
        description="messages queued for one consumer at most (ZeroMQ SNDHWM): the memory a consumer that stops "
        "reading can hold is this many messages",
    )
    answer_timeout_s: float = setting(
        10.0, reload=R, ge=0.1, le=300, description="an answer the consumer does not take within this is abandoned"
    )


class TriggerConfig(Section):
    endpoint: OptionalEndpoint = setting(
        "",
        reload=R,
        description="ZeroMQ ROUTER bind endpoint of the trigger service (docs/parts.md#the-trigger-endpoint): "
        "{camera, part_id} software-triggers a part-mode camera or names its next frame; e.g. tcp://127.0.0.1:5558; "
        "empty = off. CURVE as [publish]",
    )
    max_pending: int = setting(
        64, reload=R, ge=1, le=10_000, description="triggers waiting for one camera at most; more are refused (busy)"
    )


class ArchiveConfig(Section):
    dir: PathText = setting(
        "", reload=R, description="folder of the durable copy of every defect event (docs/archive.md); empty = off"
    )
    max_bytes: int = setting(
        10_000_000_000, reload=R, ge=0, le=10**16, description="the oldest entries go beyond this many bytes; 0 = no limit"
    )
    max_age_s: float = setting(
        30 * 86400, reload=R, ge=0, le=100 * 365 * 86400, description="entries older than this go; 0 = kept forever"
    )
    frame_format: Literal["jpeg", "png"] = setting(
        "jpeg", reload=C, description="the frame kept with each entry; png is lossless (for retraining), about 10x larger"
    )
    ok_every: int = setting(
        0,
        reload=C,
        ge=0,
        le=1_000_000_000,
        description="also keep ok frames whose frame_seq is a multiple of this (negatives for retraining); 0 = defects only",
    )
    queue_size: int = setting(
        256,
        reload=R,
        ge=1,
        le=100_000,
        description="entries waiting for the disk before new ones are dropped (counted); bounds memory",
    )


_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


class WebServerConfig(Section):
    """An HTTP endpoint of the daemon ([metrics], [ui]): bind address, optional HTTPS and basic auth."""

    _section: ClassVar[str] = "metrics"
    host: str = setting("127.0.0.1", reload=R, description="bind address of /metrics, /healthz, /readyz")
    port: int = setting(9108, reload=R, ge=0, le=65535, description="0 = any free port")
    tls_cert_file: PathText = setting(
        "", reload=R, description="PEM certificate (chain) to serve HTTPS with; with tls_key_file. Empty = plain HTTP"
    )
    tls_key_file: PathText = setting("", reload=R, description="PEM private key of tls_cert_file (mode 0600)")
    basic_auth_users: dict[str, str] = setting(
        default_factory=dict,
        reload=R,
        description="user = bcrypt hash (inspectd keys hash-password); every request then needs one of them. Empty = no auth",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value:
            raise ValueError("empty; use 0.0.0.0 (or ::) for every interface")
        return check_host(value)

    @field_validator("basic_auth_users")
    @classmethod
    def _users(cls, value: dict[str, str]) -> dict[str, str]:
        for user, hashed in value.items():
            if not user or ":" in user or not user.isprintable():
                raise ValueError(f"user {user!r}: a printable name without ':' expected")
            if not _BCRYPT.fullmatch(hashed):
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
    enabled: bool = setting(
        False,
        reload=R,
        description="serve the live view; off by default so that an upgrade never opens a port a running line did not ask for",
    )
    host: str = setting(
        "127.0.0.1", reload=R, description="bind address of the live view; any other than loopback needs ui.basic_auth_users"
    )
    port: int = setting(8080, reload=R, ge=0, le=65535, description="0 = any free port")
    max_fps: float = setting(
        5.0, reload=R, gt=0, le=30, description="live images per second per camera, at most (rendered only while someone watches)"
    )
    width: int = setting(640, reload=R, ge=64, le=4096, description="live images are scaled down to this width at most")
    map: Literal["relative", "probability"] = setting(
        "relative",
        reload=R,
        description="the map blended into live pictures and defect overlays: relative to each frame's mask threshold "
        "(green = where regions are cut; defects only), or the calibrated probability sigmoid(cam_logits)",
    )
    recent: int = setting(50, reload=R, ge=1, le=1000, description="recent defects listed (archive off: kept in memory)")
    recent_bytes: int = setting(
        64_000_000,
        reload=R,
        ge=1_000_000,
        le=16_000_000_000,
        description="memory for the recent defects' frames when the archive is off (the oldest go first)",
    )
    collect_dir: PathText = setting(
        "",
        reload=R,
        description="folder the 'save as ok / defect' buttons write frames "
        "to (DIR/ok, DIR/defect: the layout `inspectd train` reads); empty = no buttons",
    )

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> UiConfig:
        if self.enabled and not self.basic_auth_users and not is_loopback_endpoint(f"tcp://{self.host}:{self.port}"):
            raise ValueError(
                f"ui.host {self.host!r} is reachable from the network: set ui.basic_auth_users (and "
                "ui.tls_cert_file / ui.tls_key_file), or keep ui.host on 127.0.0.1 and use an SSH tunnel"
            )
        return self
