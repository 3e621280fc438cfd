"""Binding the daemon's ZeroMQ sockets (events, replay): one way, one error message."""

from __future__ import annotations

__all__ = ["bind"]

import zmq

from inspectd.errors import ConfigError


def bind(kind: int, endpoint: str, key: str, options: dict[int, int]) -> tuple[zmq.Context, zmq.Socket, str]:
    """A new context and socket of `kind` with `options`, bound to `endpoint` -> (context, socket, the
    bound endpoint with a wildcard port resolved). ConfigError naming the config `key` if it cannot bind."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    for option, value in options.items():
        sock.setsockopt(option, value)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        raise ConfigError(f"{key} {endpoint!r}: cannot bind: {zmq.strerror(exc.errno)}") from None
    return ctx, sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
