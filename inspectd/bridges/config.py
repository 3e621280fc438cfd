"""The bridges' configuration (`inspectd proxy`, `inspectd bridge mqtt|opcua`): one TOML file, one model per section.

    settings = load_bridge_settings(Path("/etc/inspectd/bridges.toml"))
    settings.daemons[0].endpoint, settings.mqtt.host, settings.opcua.endpoint

Every bridge subscribes to the daemons of `[[daemons]]` and reads only its own section besides. The
file takes no environment overrides (secrets live in files named by it: `password_file`, key files).
The same checks as the daemon's config: unknown keys are errors, every error names the key, relative
paths are relative to the file, and a file that group or others can write is refused.
"""

from __future__ import annotations

__all__ = [
    "DaemonSource",
    "ClientConfig",
    "ProxyConfig",
    "MqttConfig",
    "OpcUaConfig",
    "BridgeSettings",
    "load_bridge_settings",
    "DEFAULT_BRIDGES_CONFIG",
]

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from inspectd.config import CurveServerConfig, load_toml_model
from inspectd.config.base import PathText, Section, check_endpoint, repeated
from inspectd.security import ClientKeys, check_config_file

DEFAULT_BRIDGES_CONFIG = Path("/etc/inspectd/bridges.toml")
_ID = re.compile(r"[a-z0-9_-]{1,64}")


def _check_line(value: str) -> str:
    """A line name: it becomes part of MQTT topics and OPC UA node ids."""
    if not _ID.fullmatch(value):
        raise ValueError("1-64 characters of a-z, 0-9, _ and - (it becomes part of MQTT topics)")
    return value


def _connect_endpoint(value: str) -> str:
    """A ZeroMQ endpoint to connect to: tcp://HOST:PORT (any host name: it may resolve later) or ipc://PATH."""
    scheme, sep, rest = value.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme == "ipc" and rest:
        return value
    if scheme != "tcp" or not colon or not host or not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError("expected tcp://HOST:PORT (PORT 1-65535) or ipc://PATH")
    return value


class DaemonSource(Section):
    endpoint: str = Field(description="the daemon's [publish] endpoint, e.g. tcp://linepc3:5556")
    replay: str = Field("", description="its [replay] endpoint: gaps are filled from it (bridge mqtt); empty = none")
    server_key: PathText = Field("", description="its CURVE public key file (server.key) when it uses CURVE; needs [client] key")
    line: str = Field("", description="the line it inspects (MQTT topics, OPC UA folders); default: [mqtt] line")
    trigger: str = Field("", description="its [trigger] endpoint: the OPC UA part handshake asks for parts there; empty = none")
    parts: list[str] = Field(
        default_factory=list,
        description="its cameras in part mode whose part handshake the OPC UA bridge serves (docs/parts.md); needs trigger",
    )

    @field_validator("endpoint", "replay", "trigger")
    @classmethod
    def _endpoints(cls, value: str, info: ValidationInfo) -> str:
        return _connect_endpoint(value) if value or info.field_name == "endpoint" else value

    @model_validator(mode="after")
    def _parts_need_trigger(self) -> DaemonSource:
        if self.parts and not self.trigger:
            raise ValueError(f"daemon {self.endpoint}: parts {self.parts} need its trigger endpoint (trigger = ...)")
        bad = [c for c in self.parts if not re.fullmatch(r"[a-z0-9_-]{1,64}", c)]
        if bad:
            raise ValueError(f"parts: {bad} are not camera ids ([a-z0-9_-], 1-64 characters)")
        return self

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        return _check_line(value) if value else value  # empty: [mqtt] line


class ClientConfig(Section):
    key: PathText = Field(
        "",
        description="our CURVE secret key file (NAME.key_secret, mode 0600) for daemons with a "
        "server_key; its public half goes into each daemon's publish.curve_clients folder",
    )


class ProxyConfig(CurveServerConfig):
    endpoint: str = Field(
        "tcp://127.0.0.1:5560", description="where the proxy binds its XPUB socket: consumers subscribe here as to a daemon"
    )
    hwm: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="messages queued per consumer (and per daemon) before "
        "new ones are dropped (a seq gap on the consumer's side)",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_endpoint(value)


class MqttConfig(Section):
    host: str = Field("127.0.0.1", description="the MQTT broker")
    port: int = Field(1883, ge=1, le=65535, description="1883, or 8883 with TLS")
    client_id: str = Field(
        "", description="MQTT client id: must be stable for the persistent session (default inspectd-<host name>)"
    )
    username: str = Field("", description="broker login; empty = anonymous")
    password_file: PathText = Field("", description="file holding the broker password (one line, mode 0600)")
    tls_ca_file: PathText = Field("", description="CA certificate (PEM) of the broker: TLS on when set")
    topic_prefix: str = Field("inspectd", description="topics are PREFIX/LINE/CAMERA/KIND (docs/integration.md)")
    line: str = Field("line", description="the LINE of daemons without their own [[daemons]] line")
    qos: Literal[1, 2] = Field(
        1,
        description="QoS of events, 1 or 2 (0 could lose events: the bridge counts an event "
        "forwarded when the broker acknowledged it); status and bridge state: 1, retained",
    )
    frames: Literal["separate", "inline", "none"] = Field(
        "separate",
        description="masks and attached frames: separate = binary messages on "
        ".../defect/RUN/SEQ/mask, /frame, /regions; inline = base64 in the header's attachments_base64; none = "
        "headers only",
    )
    state_file: PathText = Field(
        "",
        description="where the bridge keeps what it has published (run, topic, seq) "
        "across its restarts; empty = in memory only (a restart then starts from the present)",
    )
    keepalive_s: int = Field(
        30,
        ge=5,
        le=3600,
        description="MQTT keepalive; the broker publishes the bridge's Last Will after 1.5x this without a word",
    )
    max_queued: int = Field(
        5_000,
        ge=10,
        le=10_000,
        description="events held while the broker is away; beyond, the "
        "bridge stops taking events until it is back (the daemon's replay fills the gap)",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\x00") or value.startswith("/") or value.endswith("/"):
            raise ValueError("a topic prefix without + # NUL or a leading/trailing /, e.g. inspectd or plant/a")
        return value

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        return _check_line(value)

    def effective_client_id(self) -> str:
        return self.client_id or f"inspectd-{socket.gethostname()}"


class OpcUaConfig(Section):
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/inspectd", description="where the OPC UA server listens")
    namespace: str = Field("urn:inspectd", description="namespace URI of the inspectd nodes (docs/integration.md)")
    security: Literal["none", "sign_and_encrypt", "both"] = Field(
        "none",
        description="none; sign_and_encrypt = Basic256Sha256 SignAndEncrypt only (needs certificate and "
        "private_key); both = offer both",
    )
    certificate: PathText = Field("", description="the server's certificate (PEM or DER) for Basic256Sha256")
    private_key: PathText = Field("", description="its private key (PEM, mode 0600)")
    trusted_clients: PathText = Field(
        "",
        description="folder of client certificates (DER/PEM) allowed to connect with "
        "security; empty = any client that completes the handshake",
    )
    deadline_margin_ms: float = Field(
        250,
        ge=0,
        le=60_000,
        description="part handshake: no verdict this long after the daemon's own deadline_ms (from the trigger) "
        "ends the part not_inspected (Reject TRUE) on the bridge's side",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^/:\s]+:\d{1,5}(/\S*)?", value):
            raise ValueError("expected opc.tcp://HOST:PORT/PATH, e.g. opc.tcp://0.0.0.0:4840/inspectd")
        return value

    @model_validator(mode="after")
    def _certs(self) -> OpcUaConfig:
        if self.security != "none" and not (self.certificate and self.private_key):
            raise ValueError(f"opcua.security {self.security!r} needs opcua.certificate and opcua.private_key")
        return self


class BridgeSettings(Section):
    daemons: list[DaemonSource] = Field(
        default_factory=list, validate_default=True, description="one [[daemons]] table per daemon"
    )
    client: ClientConfig = ClientConfig()
    proxy: ProxyConfig = ProxyConfig()
    mqtt: MqttConfig = MqttConfig()
    opcua: OpcUaConfig = OpcUaConfig()

    @field_validator("daemons")
    @classmethod
    def _some(cls, daemons: list[DaemonSource]) -> list[DaemonSource]:
        if not daemons:
            raise ValueError("no [[daemons]]: name at least one daemon's endpoint to subscribe to")
        dupes = repeated([d.endpoint for d in daemons])
        if dupes:
            raise ValueError(f"each daemon once; repeated: {', '.join(dupes)}")
        return daemons

    @model_validator(mode="after")
    def _client_key(self) -> BridgeSettings:
        if any(d.server_key for d in self.daemons) and not self.client.key:
            raise ValueError("a daemon has a server_key (CURVE): set [client] key, our own .key_secret file")
        return self

    def client_keys(self) -> list[ClientKeys | None]:
        """Per daemon: our key pair and its public key, or None (plain text). ConfigError for a bad key file."""
        return [
            ClientKeys.load(self.client.key, d.server_key, keys=("client.key", "daemons.server_key")) if d.server_key else None
            for d in self.daemons
        ]

    def line_of(self, daemon: DaemonSource) -> str:
        return daemon.line or self.mqtt.line


def load_bridge_settings(path: Path) -> BridgeSettings:
    """Read and check the bridges' config (ConfigError, exit 78, in one line naming the key)."""
    settings = load_toml_model(path, BridgeSettings)
    check_config_file(path, holds_secrets=False)
    return settings
