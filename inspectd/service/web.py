"""The daemon's HTTP servers (/metrics and the live view): one WSGI server, HTTPS and basic auth optional.

    server = WebServer(app, "127.0.0.1", 9108, web=web_security(settings.metrics, "metrics"), section="metrics")
    server.start(); ...; server.stop()

Why the standard library's wsgiref: prometheus_client serves its WSGI app on it already, the daemon's
HTTP traffic is a scrape every few seconds and a handful of people looking at the live view, and a
long-lived MJPEG response is simply a generator on its own thread. No new dependency reaches the line
PC, and TLS and auth are written once, here, for both. In front of it, a gate (`_Gate`): a connection
gets a thread only once its request line and headers are in (within HEADER_TIMEOUT_S), so connections
that never finish their request (slowloris) cost a buffer, not a thread; at most MAX_PENDING wait and
MAX_THREADS requests run (then 503). Measured against cheroot and waitress under 2000 such
connections: docs/performance.md#http-under-abuse.
"""

from __future__ import annotations

__all__ = ["WebServer", "WebSecurity", "web_security", "authorized", "UNAUTHORIZED_HEADERS"]

import base64
import contextlib
import errno
import io
import logging
import selectors
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from inspectd.errors import ConfigError
from inspectd.security import PasswordCheck, private_file
from inspectd.threads import name_this_thread

log = logging.getLogger("inspectd.service.web")

UNAUTHORIZED_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("WWW-Authenticate", 'Basic realm="inspectd", charset="UTF-8"'),
]


# A request's line and headers arrive within this, whole, before a thread is given to it (slowloris).
HEADER_TIMEOUT_S = 10.0
# Connections still sending their headers, at most: beyond it the oldest is closed (a flood of half-open
# connections costs a buffer each, never a thread, and cannot lock out a client that sends its request).
MAX_PENDING = 4096
# Request threads at once (requests being answered, live-view streams included): beyond it, 503.
MAX_THREADS = 128
_MAX_HEADER_BYTES = 65536 + 16384  # the request line wsgiref accepts, and room for the headers


class _Waiting:
    """A connection in the gate: by when its headers must be in, what has arrived, its TLS handshake."""

    __slots__ = ("deadline", "address", "buffer", "shaken")

    def __init__(self, deadline: float, address: object):
        self.deadline, self.address, self.buffer, self.shaken = deadline, address, bytearray(), False


class _Gate:
    """Connections wait here, on one thread and a selector, until their request line and headers are in;
    only then does a request thread take them (with what was read). Hand-written because the standard
    library's servers give each connection a thread at accept, cheroot gives one as soon as a byte arrives
    and then waits on the rest, and waitress has no TLS (docs/performance.md#http-under-abuse)."""

    def __init__(self, server: _ThreadingWSGIServer):
        self.server = server
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, _Waiting] = {}  # insertion order: oldest first
        self._admit: list[tuple[socket.socket, object]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{server.thread_name}-gate", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, address) -> None:
        """From the accepting thread: a new connection, to be read without blocking."""
        with self._lock:
            self._admit.append((sock, address))
        self._wake_w.send(b"x")

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                assert isinstance(sock, socket.socket)
                if self._read(sock):
                    self._hand_over(sock)
            with self._lock:
                new, self._admit = self._admit, []
            for sock, address in new:
                if self._add(sock, address):  # the request came with the connection
                    self._hand_over(sock)
            self._expire()
        for sock in list(self._pending):
            self._drop(sock)

    def _add(self, sock: socket.socket, address) -> bool:
        """Start reading a new connection; True if its headers are whole already."""
        while len(self._pending) >= MAX_PENDING:
            self._drop(next(iter(self._pending)))  # the oldest: a client sending its request gets in
        sock.setblocking(False)
        self._pending[sock] = _Waiting(time.monotonic() + HEADER_TIMEOUT_S, address)
        self._selector.register(sock, selectors.EVENT_READ)
        return self._read(sock)  # a TLS handshake to start, or data already there

    def _read(self, sock: socket.socket) -> bool:
        """Read what is there; True once the headers are whole (then it is no longer pending)."""
        waiting = self._pending.get(sock)
        if waiting is None:
            return False
        buffer = waiting.buffer
        try:
            if isinstance(sock, ssl.SSLSocket) and not waiting.shaken:
                sock.do_handshake()
                waiting.shaken = True
            while True:
                chunk = sock.recv(16384)
                if not chunk:
                    self._drop(sock)  # the client went away
                    return False
                buffer += chunk
                if b"\r\n\r\n" in buffer or len(buffer) > _MAX_HEADER_BYTES:
                    return True
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    return False
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError:  # a failed handshake, a reset: not worth more than a debug line
            log.debug("HTTP: a connection failed before its request", exc_info=True)
            self._drop(sock)
            return False

    def _hand_over(self, sock: socket.socket) -> None:
        waiting = self._pending.pop(sock)
        self._selector.unregister(sock)
        sock.setblocking(True)
        sock.settimeout(_QuietHandler.timeout)
        if not self.server.take_thread():
            with contextlib.suppress(OSError):
                sock.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                    b"busy: too many requests at once; try again\n"
                )
            self.server.shutdown_request(sock)
            return
        self.server.prefixes[sock] = bytes(waiting.buffer)
        socketserver.ThreadingMixIn.process_request(self.server, sock, waiting.address)

    def _expire(self) -> None:
        now = time.monotonic()
        for sock, waiting in list(self._pending.items()):
            if now < waiting.deadline:
                break  # insertion order: the rest are younger
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._pending.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: accepting costs a gate entry, not a thread
    thread_name = "http"  # the OS-level name of its request threads (WebServer sets it: metrics-req, ui-req)
    send_buffer = 0  # SO_SNDBUF of each connection (WebServer sets it; 0: the kernel's autotuning)
    gate: _Gate | None = None

    def server_activate(self):
        super().server_activate()
        self.prefixes: dict[socket.socket, bytes] = {}  # what the gate read of each request, for its handler
        self._threads_lock = threading.Lock()
        self._busy = 0

    def process_request(self, request, client_address):
        """Not a thread yet: the gate reads the request's headers first (made at the first connection, after
        WebServer has set the thread name)."""
        if self.gate is None:
            self.gate = _Gate(self)
        self.gate.admit(request, client_address)

    def take_thread(self) -> bool:
        with self._threads_lock:
            if self._busy >= MAX_THREADS:
                return False
            self._busy += 1
            return True

    def process_request_thread(self, request, client_address):
        name_this_thread(self.thread_name)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._threads_lock:
                self._busy -= 1

    def server_close(self):
        if self.gate is not None:
            self.gate.close()
        super().server_close()

    def handle_error(self, request, client_address):
        """A client that fails the TLS handshake, or goes away mid-request: not worth a traceback on stderr."""
        log.debug("HTTP: request from %s failed", client_address, exc_info=True)


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


# Bind failures caused by the port (the rest are the host's): in use, or privileged (< 1024).
_PORT_ERRNOS = {errno.EADDRINUSE, errno.EACCES}


def _bind_error(section: str, what: str, host: str, port: int, exc: OSError) -> ConfigError:
    """A bind failure as a config error naming the key to change and the address (like publish.endpoint's)."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"{section}.host {host!r}: cannot resolve: {reason}")
    key = f"{section}.port" if exc.errno in _PORT_ERRNOS else f"{section}.host"
    return ConfigError(f"{key}: cannot bind {host}:{port} for {what}: {reason}")


def _server_class(host: str) -> type[_ThreadingWSGIServer]:
    """The IPv6 server for an IPv6 address (or a name that resolves only to one), else IPv4."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return _ThreadingWSGIServer  # bind reports it, as a ConfigError naming the host key
    families = {info[0] for info in infos}
    return _ThreadingWSGIServer if socket.AF_INET in families else _ThreadingWSGIServer6


# What a client does to a response (goes away, stops reading, fails TLS): not worth more than a debug line.
_CLIENT_ERRORS = (TimeoutError, ConnectionError, ssl.SSLError)


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info) -> None:
        """wsgiref prints tracebacks to stderr: clients' faults go to the debug log, the application's to the
        journal as errors."""
        if isinstance(exc_info[1], _CLIENT_ERRORS):
            log.debug("HTTP: client error: %s", exc_info[1])
        else:
            log.error("HTTP: request failed", exc_info=exc_info)


_BODY_TIMEOUT_S = 2.0  # a POST body (the live view's collect request) arrives within this once its headers have


class _Prefixed(io.RawIOBase):
    """A connection's bytes, the ones the gate read first."""

    def __init__(self, prefix: bytes, sock: socket.socket):
        self._prefix, self._sock = memoryview(prefix), sock

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(b)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that stalls mid-request (or mid-handshake, or stops reading a stream) frees its thread

    def handle(self):
        """WSGIRequestHandler.handle (Python 3.11), with the ServerHandler that logs through `logging`."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        if self.command == "POST":  # a body of a few hundred bytes: one that does not come frees its thread soon
            self.connection.settimeout(_BODY_TIMEOUT_S)
        handler = _ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())

    def setup(self):
        super().setup()
        prefix = self.server.prefixes.pop(self.request, b"")  # the line and headers the gate read
        self.rfile = io.BufferedReader(_Prefixed(prefix, self.connection))
        send_buffer = getattr(self.server, "send_buffer", 0)
        if send_buffer:  # a stream cannot fall more than this many bytes behind what is drawn
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)

    def log_message(self, format, *args):  # noqa: A002  (scrapes every few seconds would flood the journal)
        pass


@dataclass(frozen=True)
class WebSecurity:
    """TLS and basic auth of an HTTP endpoint (`tls_*`, `basic_auth_users` of [metrics] or [ui]), as
    Prometheus' exporter web config: a TLS certificate and key, and bcrypt-hashed users."""

    tls: ssl.SSLContext | None
    users: PasswordCheck | None


def web_security(cfg, section: str = "metrics") -> WebSecurity | None:
    """From a `WebServerConfig` section; None when neither TLS nor users are set. ConfigError naming the key
    for a key file others can read, or a certificate and key that do not load."""
    tls = None
    if cfg.tls_cert_file:
        key = private_file(cfg.tls_key_file, f"{section}.tls_key_file")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(cfg.tls_cert_file, key)
        except FileNotFoundError:
            raise ConfigError(f"{section}.tls_cert_file {cfg.tls_cert_file!r}: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{section}.tls_cert_file / tls_key_file: cannot load the certificate and key: "
                f"{getattr(exc, 'reason', None) or exc}"
            ) from None
    users = PasswordCheck(cfg.basic_auth_users) if cfg.basic_auth_users else None
    return WebSecurity(tls, users) if tls is not None or users is not None else None


def authorized(users: PasswordCheck, header: str) -> bool:
    """HTTP basic auth: `Basic base64(user:password)`."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, colon, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return bool(colon) and users.check(user, password)


App = Callable  # a WSGI application


class WebServer:
    """A threaded WSGI server; with `web`, HTTPS and/or basic auth in front of every path.

    Binds when built: ConfigError naming SECTION.port (in use, privileged) or SECTION.host (not an
    address of this machine, unresolvable) with the address, if it cannot.
    """

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        web: WebSecurity | None = None,
        section: str = "metrics",
        what: str = "/metrics",
        name: str = "metrics-http",
        send_buffer: int = 0,
    ):
        """`send_buffer`: SO_SNDBUF of each connection (0: the kernel's autotuning), to keep streams current."""
        users = web.users if web is not None else None

        def guarded(environ, start_response):
            if users is not None and not authorized(users, environ.get("HTTP_AUTHORIZATION", "")):
                start_response("401 Unauthorized", UNAUTHORIZED_HEADERS)
                return [b"unauthorized\n"]
            return app(environ, start_response)

        try:
            self._server = make_server(host, port, guarded, _server_class(host), handler_class=_QuietHandler)
        except OSError as exc:  # in use, an address not on this machine, an unresolvable name
            raise _bind_error(section, what, host, port, exc) from None
        self._server.send_buffer = send_buffer
        self._server.thread_name = f"{section}-req"
        if web is not None and web.tls is not None:
            self._server.socket = web.tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if web is not None and web.tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (if it started: socketserver's shutdown() waits forever for a loop that never ran) and
        close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
