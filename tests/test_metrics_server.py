"""The /metrics server: bind failures name the key to change; no `_created` series; HTTPS and basic auth."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support import http_get, self_signed_cert

from inspectd.config import MetricsConfig
from inspectd.errors import ConfigError, ExitCode
from inspectd.metrics import Metrics
from inspectd.security import hash_password
from inspectd.service.metrics import MetricsServer
from inspectd.service.web import web_security


def _ok() -> tuple[bool, str]:
    return True, "ok"


def test_no_created_series_for_labelled_metrics():
    metrics = Metrics(CollectorRegistry())
    metrics.frames_captured.labels(camera="a").inc()
    metrics.frames_dropped.labels(camera="a", reason="stale").inc()
    metrics.end_to_end_seconds.labels(camera="a").observe(0.1)
    metrics.inference_seconds.labels(model="default").observe(0.1)
    text = generate_latest(metrics.registry).decode()
    assert "inspectd_frames_captured_total" in text and "inspectd_end_to_end_seconds_bucket" in text
    assert "_created" not in text


def test_served_metrics_have_no_created_series():
    metrics = Metrics(CollectorRegistry())
    metrics.frames_captured.labels(camera="a").inc()
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, _ok, _ok)
    server.start()
    try:
        status, body = http_get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert status == 200 and 'inspectd_frames_captured_total{camera="a"} 1.0' in body and "_created" not in body


def test_a_port_in_use_names_metrics_port_and_the_address():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as exc:
            MetricsServer(CollectorRegistry(), "127.0.0.1", port, _ok, _ok)
    assert str(exc.value) == f"metrics.port: cannot bind 127.0.0.1:{port} for /metrics: Address already in use"
    assert exc.value.exit_code == ExitCode.CONFIG


def test_an_address_not_on_this_machine_names_metrics_host():
    with pytest.raises(ConfigError, match=r"^metrics\.host: cannot bind 203\.0\.113\.7:0 for /metrics: "):
        MetricsServer(CollectorRegistry(), "203.0.113.7", 0, _ok, _ok)  # TEST-NET-3: never local


def test_an_unresolvable_name_names_metrics_host():
    with pytest.raises(ConfigError, match=r"^metrics\.host 'no-such-host\.invalid': cannot resolve"):
        MetricsServer(CollectorRegistry(), "no-such-host.invalid", 0, _ok, _ok)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_an_ipv6_host_is_served():
    try:
        server = MetricsServer(CollectorRegistry(), "::1", 0, _ok, _ok)
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server.start()
    try:
        status, body = http_get(f"http://[::1]:{server.port}/healthz")
    finally:
        server.stop()
    assert status == 200 and body == "ok: ok\n"


# -- HTTPS and basic auth (`[metrics] tls_*`, `basic_auth_users`) -------------------------------------------


def _fetch(url: str, cafile: Path | None = None, auth: tuple[str, str] | None = None) -> tuple[int, str, dict]:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.fixture()
def secured(tmp_path):
    """A metrics server on HTTPS with one user (prom / s3cret); yields (base URL, CA file)."""
    cert, key = self_signed_cert(tmp_path)
    cfg = MetricsConfig(
        tls_cert_file=str(cert), tls_key_file=str(key), basic_auth_users={"prom": hash_password("s3cret", rounds=10)}
    )
    metrics = Metrics(CollectorRegistry())
    metrics.frames_captured.labels(camera="a").inc()
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, _ok, _ok, web=web_security(cfg))
    server.start()
    try:
        yield f"https://127.0.0.1:{server.port}", cert
    finally:
        server.stop()


def test_https_with_basic_auth_serves_only_a_known_user(secured):
    url, ca = secured
    status, body, _ = _fetch(url + "/metrics", ca, ("prom", "s3cret"))
    assert status == 200 and 'inspectd_frames_captured_total{camera="a"} 1.0' in body
    assert _fetch(url + "/healthz", ca, ("prom", "s3cret"))[:2] == (200, "ok: ok\n")
    for auth in (None, ("prom", "wrong"), ("someone", "s3cret")):
        status, body, headers = _fetch(url + "/metrics", ca, auth)
        assert status == 401 and "inspectd_" not in body and headers["WWW-Authenticate"].startswith("Basic")
    assert _fetch(url + "/healthz", ca)[0] == 401


def test_https_refuses_plain_http_and_an_untrusted_client_and_keeps_serving(secured):
    url, ca = secured
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        _fetch(url.replace("https", "http") + "/metrics", auth=("prom", "s3cret"))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _fetch(url + "/metrics", auth=("prom", "s3cret"))  # the system's CAs do not know our certificate
    assert _fetch(url + "/metrics", ca, ("prom", "s3cret"))[0] == 200  # still serving after both


def test_a_tls_key_others_can_read_is_refused(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="metrics.tls_key_file .*mode 0644"):
        web_security(MetricsConfig(tls_cert_file=str(cert), tls_key_file=str(key)))
    os.chmod(key, 0o600)
    with pytest.raises(ConfigError, match="cannot load the certificate and key"):
        web_security(MetricsConfig(tls_cert_file=str(key), tls_key_file=str(key)))


def test_half_open_connections_cost_no_threads_and_lock_no_one_out(monkeypatch):
    """Slowloris against /metrics: 2000 connections that send half a request and go silent (404 such held 430
    threads). They wait in the gate, on one thread, while /metrics answers; each is dropped when its headers
    have not come within HEADER_TIMEOUT_S (shortened here). Measured against cheroot and waitress in
    docs/performance.md (benchmarks/http_abuse.py)."""
    import resource
    import threading
    import time

    from support import wait_until

    import inspectd.service.web as web

    monkeypatch.setattr(web, "HEADER_TIMEOUT_S", 3.0)
    count = min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 3)
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, _ok, _ok)
    server.start()
    held: list[socket.socket] = []
    threads_before = threading.active_count()
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            held.append(sock)
        for _ in range(5):
            start = time.monotonic()
            status, _ = http_get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
            assert status == 200 and time.monotonic() - start < 2.5
        assert threading.active_count() - threads_before <= 8, threading.active_count()  # the gate, not one each

        def dropped() -> int:  # the server closed them: a read returns b"" (EOF)
            closed = 0
            for sock in held:
                sock.settimeout(0.001)
                try:
                    closed += sock.recv(1) == b""
                except (TimeoutError, BlockingIOError):
                    pass
                except OSError:
                    closed += 1
            return closed

        wait_until(lambda: dropped() == count, 30, lambda: f"every half-open connection dropped, {dropped()} of {count}")
    finally:
        for sock in held:
            sock.close()
        server.stop()
