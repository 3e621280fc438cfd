"""The daemon's bound ZeroMQ sockets (events, replay): one way to bind, secure and watch them.

    server = ServerSocket(zmq.PUB, "tcp://0.0.0.0:5556", "publish.endpoint", {zmq.SNDHWM: 100}, keys, refused)
    server.sock.send_multipart(...)     # the owner thread only (ZeroMQ sockets are not thread-safe)
    server.check_handshakes()           # the owner thread, now and then: counts refused handshakes
    server.close(linger_ms=0)

With `keys` (inspectd.security.ServerKeys) the socket is a CURVE server: traffic is encrypted and
only clients whose public key is in the allow-list get through the handshake, checked by pyzmq's
ZAP authenticator (`zmq.auth`) on a thread of its own. Every failed handshake is reported through
`refused(reason)`: "auth" (a key not in the allow-list), "protocol" (a plaintext client, or one
holding the wrong server key), "other" (the peer hung up mid-handshake: also what a port scan or a
TCP health check looks like).
"""

from __future__ import annotations

__all__ = ["ServerSocket"]

from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import parse_monitor_message

from inspectd.errors import ConfigError
from inspectd.outputs.wire import HANDSHAKE_FAILED, zmq_reason

if TYPE_CHECKING:
    from inspectd.security import ServerKeys


class ServerSocket:
    """A context, a socket of `kind` with `options` bound to `endpoint`, and (with keys) its CURVE
    authenticator and handshake monitor. ConfigError naming the config `key` if it cannot bind."""

    def __init__(
        self,
        kind: int,
        endpoint: str,
        key: str,
        options: dict[int, int],
        keys: ServerKeys | None = None,
        refused: Callable[[str], None] = lambda reason: None,
    ):
        self.ctx = zmq.Context()
        self._auth = None
        self._monitor: zmq.Socket | None = None
        self._refused = refused
        self.sock = self.ctx.socket(kind)
        try:
            for option, value in options.items():
                self.sock.setsockopt(option, value)
            if keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self.ctx, log=_zmq_auth_log())
                self._auth.start()
                self._auth.configure_curve_callback("*", keys.allow)
                keys.apply(self.sock)
                self._monitor = self.sock.get_monitor_socket(sum(HANDSHAKE_FAILED))
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"{key} {endpoint!r}: cannot bind: {zmq_reason(exc)}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.curve = keys is not None

    def check_handshakes(self) -> None:
        """Report the handshakes refused since the last call (owner thread; never blocks)."""
        while self._monitor is not None and self._monitor.poll(0, zmq.POLLIN):
            event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"]
            reason = HANDSHAKE_FAILED.get(event)
            if reason is not None:
                self._refused(reason)

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.sock.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()


def _zmq_auth_log():
    """pyzmq's authenticator logs every denial at debug on this logger; ours (AllowList) says it once a minute."""
    import logging

    return logging.getLogger("inspectd.zmq.auth")
