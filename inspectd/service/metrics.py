"""The /metrics, /healthz, /readyz HTTP server (the metrics themselves: `inspectd.metrics`)."""

from __future__ import annotations

__all__ = ["MetricsServer", "Check"]

from collections.abc import Callable

from prometheus_client import CollectorRegistry, make_wsgi_app

from inspectd.service.web import WebSecurity, WebServer

Check = Callable[[], tuple[bool, str]]


class MetricsServer(WebServer):
    """HTTP server: /metrics (Prometheus), /healthz (alive and progressing), /readyz (warm and bound).

    Binds when built: ConfigError naming metrics.port (in use, privileged) or metrics.host (not an
    address of this machine, unresolvable) with the address, if it cannot.
    """

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, healthz: Check, readyz: Check, web: WebSecurity | None = None
    ):
        """`web`: HTTPS and/or basic auth on every path (web_security); None = plain HTTP, no auth."""
        metrics_app = make_wsgi_app(registry)
        checks = {"/healthz": healthz, "/readyz": readyz}

        def app(environ, start_response):
            check = checks.get(environ.get("PATH_INFO", ""))
            if check is None:
                return metrics_app(environ, start_response)
            ok, detail = check()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'fail'}: {detail}\n".encode()]

        super().__init__(app, host, port, web, section="metrics", what="/metrics", name="metrics-http")
