"""What every configuration section is built on: the section base, `setting()`, value types and checks.

A setting is declared once, as a field: its default, bounds and description, and how a reload
(SIGHUP) treats it (`Reload`). Whether it is a path is its type (`PathText`). The reload table,
path resolution, the configuration reference (docs/configuration.md) and the checks of
config.example.toml are all derived from these declarations.
"""

from __future__ import annotations

__all__ = [
    "Section",
    "Reload",
    "setting",
    "PathText",
    "Text",
    "Endpoint",
    "OptionalEndpoint",
    "check_endpoint",
    "check_host",
    "is_path_field",
    "reload_of",
    "together",
    "no_nul",
    "repeated",
]

import enum
import ipaddress
import re
import socket
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_IPC_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL


class Reload(enum.Enum):
    """What a reload (SIGHUP) does when a setting changed."""

    ENGINE = "engine"  # load the model again and build a new engine beside the running one, then swap the context
    CONTEXT = "context"  # a new inference context with the same engine (thresholds, output options, the wait)
    LIVE = "live"  # read at each use: the settings swap alone applies it
    RESTART = "restart"  # bound at start-up (sockets, pools, queues): applies at the next restart


def setting(default: Any = ..., *, reload: Reload, description: str, **kwargs: Any) -> Any:
    """A configuration field: `pydantic.Field` plus how a reload treats it (`Reload`)."""
    return Field(default, description=description, json_schema_extra={"reload": reload.value}, **kwargs)


def reload_of(field: FieldInfo) -> Reload | None:
    """The reload class a field was declared with (`setting(reload=...)`), or None."""
    extra = field.json_schema_extra
    return Reload(extra["reload"]) if isinstance(extra, dict) and "reload" in extra else None


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


class _IsPath:
    """Marks a text field as a file or folder path: relative values are relative to the config file."""

    def __repr__(self) -> str:
        return "IS_PATH"


_IS_PATH = _IsPath()
Text = Annotated[str, AfterValidator(no_nul)]  # any text but NUL (URLs, pipelines)
PathText = Annotated[str, AfterValidator(no_nul), _IS_PATH]  # a file or folder path (or a URL, left as it is)


def _marked(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return any(m is _IS_PATH for m in typing.get_args(annotation)[1:])
    return any(_marked(arg) for arg in typing.get_args(annotation))


def is_path_field(field: FieldInfo) -> bool:
    """Whether the field's type is `PathText` (or an optional one)."""
    return any(m is _IS_PATH for m in field.metadata) or _marked(field.annotation)


class Section(BaseModel):
    """One TOML section: unknown keys are errors, values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def together(section: str, model: BaseModel, first: str, second: str, why: str) -> None:
    """ValueError unless the two string keys are both set or both empty (a key pair, a certificate and its key)."""
    if bool(getattr(model, first)) != bool(getattr(model, second)):
        raise ValueError(f"set {section}.{first} and {section}.{second} together ({why}), or neither")


def repeated(values: list[str]) -> list[str]:
    """The values that occur more than once, sorted (ids and endpoints that must be unique)."""
    return sorted({v for v in values if values.count(v) > 1})


def check_host(host: str) -> str:
    """ValueError unless `host` is an IP address literal or a name this machine resolves."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(
            "not an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0 for every interface, or a name of this machine)"
        )
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host name {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return host


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
        raise ValueError(
            "IPv6 addresses are not enabled on the publisher socket; use an IPv4 address, "
            "* (every interface) or an interface name"
        )
    if host in _interfaces():
        return
    check_host(host)


def check_endpoint(value: str) -> str:
    """A ZeroMQ bind endpoint: tcp://HOST:PORT or ipc://PATH, checked before anything binds."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ValueError("expected tcp://HOST:PORT or ipc://PATH")
    if scheme == "tcp":
        _check_tcp_endpoint(rest)
    elif not rest or "\x00" in rest or len(rest.encode("utf-8", "surrogatepass")) > _IPC_PATH_MAX:
        raise ValueError(f"ipc path must be 1-{_IPC_PATH_MAX} bytes without NUL, e.g. ipc:///run/inspectd/events")
    return value


Endpoint = Annotated[str, AfterValidator(check_endpoint)]  # a ZeroMQ bind endpoint
OptionalEndpoint = Annotated[str, AfterValidator(lambda v: check_endpoint(v) if v else v)]  # "" = off
