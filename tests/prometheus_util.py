"""Running a real Prometheus server (Debian's `prometheus` package) for integration tests.

>>> with PrometheusServer(tmp_path, targets=["127.0.0.1:9108"], rule_files=[ALERTS]) as prom:
...     prom.wait_ready()
...     prom.query("up")

It listens on 127.0.0.1 on a free port, keeps its TSDB in a temporary folder, and is always stopped
(SIGTERM, then SIGKILL) by `stop()` / the context manager.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from support import ROOT, dies_with_tests, free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "inspectd.json"


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    """`prometheus` scraping `targets` (job `job`) every `scrape_interval`, rules evaluated as often."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        rule_files: list[Path] = (),
        job: str = "inspectd",
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        labels: dict | None = None,
        jobs: list[dict] = (),
        config_file: Path | None = None,
    ):
        """`jobs`: more scrape configs, as Prometheus takes them (e.g. HTTPS with basic auth). `config_file`:
        run this config instead (e.g. the shipped one); the other arguments are then unused."""
        if PROMETHEUS is None:
            raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "prometheus.yml"
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "evaluation_interval": evaluation_interval,
                "scrape_timeout": scrape_interval,
            },
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets), "labels": dict(labels or {})}]},
                *jobs,
            ],
        }
        if config_file is not None:
            self.config_path = Path(config_file)
        else:
            self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = self.workdir / "prometheus.log"
        self._log = None
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> PrometheusServer:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            dies_with_tests(
                [
                    PROMETHEUS,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ]
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc and self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def log(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP API ------------------------------------------------------------------------------
    def api(self, path: str, **params) -> dict:
        """GET /api/v1/PATH?params; returns `data`, raises PrometheusError (with the request) on an error."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; returns the result list (vector samples, or [scalar] for scalars)."""
        params = {"query": expr} | ({"time": at} if at is not None else {})
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] == "matrix":
            return [{"metric": s["metric"], "value": s["values"][-1]} for s in data["result"] if s["values"]]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]
