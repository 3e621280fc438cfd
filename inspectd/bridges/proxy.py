"""`inspectd proxy`: many daemons as one stream, by ZeroMQ's own XSUB/XPUB proxy (`zmq.proxy_steerable`).

    Proxy(load_bridge_settings(path)).run()      # until SIGTERM/SIGINT; exit code 0

An XSUB socket connects to every daemon of `[[daemons]]` (CURVE client where the daemon has a
`server_key`), an XPUB socket binds `[proxy] endpoint` (CURVE server with `curve_secret_key` and
`curve_clients`), and libzmq moves every message between them untouched: topics, headers and
attachments as each daemon sent them, so `run_id`, `camera` and `seq` still name the origin and a
consumer detects loss per daemon (`inspectd.client` tracks each run on its own). Subscriptions go
the other way: a consumer's `defect.` reaches every daemon, so nothing is sent that nobody wants.
Consumers refused at the handshake and the connections to the daemons are logged.

The proxy holds no state, so it cannot lose what it never had: a consumer that needs gap filling
asks the daemons' replay endpoints directly (replay is not proxied). ZeroMQ reconnects to a daemon
that restarts by itself.
"""

from __future__ import annotations

__all__ = ["Proxy"]

import logging
import threading
import time
from typing import cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from inspectd.bridges import stop_on_signals
from inspectd.bridges.config import BridgeSettings
from inspectd.errors import ConfigError
from inspectd.outputs.sockets import ServerSocket
from inspectd.outputs.wire import HANDSHAKE_FAILED
from inspectd.security import ServerKeys, is_loopback_endpoint

log = logging.getLogger("inspectd.bridges.proxy")

_BECAUSE = {
    "auth": "refused our key (add our public key to its publish.curve_clients)",
    "protocol": "handshake failed (CURVE on one side only?)",
    "other": "handshake failed (the wrong server_key?)",
}
_WATCHED: dict[int, str] = {
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_DISCONNECTED: "disconnected",
    **{event: _BECAUSE[reason] for event, reason in HANDSHAKE_FAILED.items()},
}


class Proxy:
    """The proxy process: sockets, the steerable proxy on a thread, the main thread waiting for a signal."""

    def __init__(self, settings: BridgeSettings):
        self.settings = settings
        self.endpoint = settings.proxy.endpoint
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._threads: list[threading.Thread] = []
        self._backend: ServerSocket | None = None
        self._upstream: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._logged: dict[tuple, float] = {}
        self.failed = False

    def run(self) -> int:
        """Proxy until SIGTERM or SIGINT (0) or a failure of the proxy itself (1: systemd restarts it).
        ConfigError (78) for keys or an endpoint that cannot bind."""
        with stop_on_signals(self._stop):
            try:
                self.start()
                self._stop.wait()
            finally:
                self.stop()
        return 1 if self.failed else 0

    def start(self) -> None:
        cfg = self.settings.proxy
        keys = (
            ServerKeys.load(cfg.curve_secret_key, cfg.curve_clients, key="proxy.curve_secret_key")
            if cfg.curve_secret_key
            else None
        )
        upstream = self._upstream = self._connect_upstream()
        self._backend = ServerSocket(
            zmq.XPUB, cfg.endpoint, "proxy.endpoint", {zmq.SNDHWM: cfg.hwm, zmq.LINGER: 0}, keys, self._consumer_refused
        )
        self.endpoint = self._backend.endpoint
        if keys is None and not is_loopback_endpoint(self.endpoint):
            log.warning(
                "proxy on %s in plain text, open to the network: set proxy.curve_secret_key and "
                "proxy.curve_clients (docs/security.md)",
                self.endpoint,
            )
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(f"inproc://proxy-control-{id(self)}")
        steer = self._ctx.socket(zmq.PAIR)
        steer.connect(f"inproc://proxy-control-{id(self)}")
        self._steer = steer
        self._spawn(self._proxy, "proxy", upstream, self._backend.sock, steer)
        self._spawn(self._watch, "proxy-monitor", upstream)
        log.info("proxy: %d daemon(s) -> %s (%s)", len(self.settings.daemons), self.endpoint, "CURVE" if keys else "plain text")

    def _connect_upstream(self) -> zmq.Socket:
        """One XSUB socket connected to every daemon. libzmq copies the socket's CURVE options into each
        connection when it is made, so each daemon's server key is set just before its connect."""
        keys = self.settings.client_keys()
        if len({k is None for k in keys}) > 1:
            raise ConfigError("daemons: behind one proxy every [[daemons]] has a server_key (CURVE), or none does")
        sock = self._ctx.socket(zmq.XSUB)
        sock.setsockopt(zmq.RCVHWM, self.settings.proxy.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        # A daemon that is away is retried once a second at most, not 10 times: and reached within a second of its
        # restart, before its first event (the proxy holds nothing; a consumer would miss what came earlier).
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._monitor = sock.get_monitor_socket(sum(_WATCHED))
        for daemon, key in zip(self.settings.daemons, keys):
            if key is not None:
                key.apply(sock)
            sock.connect(daemon.endpoint)
        return sock

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _proxy(self, frontend: zmq.Socket, backend: zmq.Socket, control: zmq.Socket) -> None:
        try:
            zmq.proxy_steerable(frontend, backend, None, control)
        except zmq.ContextTerminated:
            pass
        except Exception:  # the proxy is the whole process: stop it with exit 1, systemd restarts it
            log.exception("proxy failed")
            self.failed = True
            self._stop.set()

    def _consumer_refused(self, reason: str) -> None:
        # "other" is also what a port scan or a TCP health check looks like: kept out of WARNING.
        self._log_once(
            logging.WARNING if reason != "other" else logging.INFO,
            ("consumer", reason),
            "refused a consumer at the handshake (%s; docs/security.md)",
            reason,
        )

    def _log_once(self, level: int, key: tuple, message: str, *args) -> None:
        """Log at most once a minute per `key` (a refused peer retries; a daemon away reconnects every 5 s)."""
        now = time.monotonic()
        if now - self._logged.get(key, -60.0) >= 60.0:
            self._logged[key] = now
            log.log(level, message, *args)

    def _watch(self, frontend: zmq.Socket) -> None:
        """Log what happens to the connections to the daemons (a daemon restarting, our key refused) and the
        consumers refused at the handshake. The monitor sockets are this thread's alone."""
        # start() made both before this thread; stop() drops them only once it has ended.
        backend, monitor = cast(ServerSocket, self._backend), cast(zmq.Socket, self._monitor)
        try:
            poller = zmq.Poller()
            poller.register(monitor, zmq.POLLIN)
            while not self._stop.is_set():
                backend.check_handshakes()
                if not poller.poll(200):
                    continue
                event = parse_monitor_message(monitor.recv_multipart())
                what = _WATCHED.get(event["event"])
                if what is not None:
                    endpoint = event["endpoint"].decode("utf-8", "replace")
                    level = logging.INFO if event["event"] in (zmq.EVENT_CONNECTED, zmq.EVENT_DISCONNECTED) else logging.ERROR
                    self._log_once(level, (endpoint, what), "daemon %s: %s", endpoint, what)
        except Exception:  # without it the proxy would go on blind: stop it (exit 1), systemd restarts it
            log.exception("proxy monitor failed")
            self.failed = True
            self._stop.set()

    def stop(self) -> None:
        """End the proxy, join its threads, close every socket and context (idempotent). Sockets a thread
        that did not end still owns are left alone (the process is ending anyway)."""
        self._stop.set()
        control = getattr(self, "_control", None)
        if control is not None and not control.closed:
            control.send(b"TERMINATE")
        for thread in self._threads:
            thread.join(5)
        if any(t.is_alive() for t in self._threads):
            log.error("proxy threads did not stop within 5 s; leaving their sockets open")
            return
        self._threads.clear()
        if self._upstream is not None and not self._upstream.closed and self._monitor is not None:
            self._upstream.disable_monitor()
        for sock in (control, getattr(self, "_steer", None), self._monitor, self._upstream):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if not self._ctx.closed:
            self._ctx.term()
            log.info("proxy stopped")
