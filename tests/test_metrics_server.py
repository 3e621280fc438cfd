"""The /metrics server: bind failures name the key to change; no `_created` series."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support import http_get

from inspectd.errors import ConfigError, ExitCode
from inspectd.service.metrics import Metrics, MetricsServer


def _ok() -> tuple[bool, str]:
    return True, "ok"


def test_no_created_series_for_labelled_metrics():
    metrics = Metrics(CollectorRegistry())
    metrics.frames_captured.labels(camera="a").inc()
    metrics.frames_dropped.labels(camera="a", reason="stale").inc()
    metrics.end_to_end_seconds.labels(camera="a").observe(0.1)
    metrics.inference_seconds.observe(0.1)
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
