"""Monitoring: the Prometheus config, alert rules and Grafana dashboard in deploy/, against the real thing.

promtool checks the config and rules and runs the rules' unit tests; then a real daemon (two synthetic
cameras and a dead one) is scraped by a real Prometheus server every second, and every PromQL
expression of the dashboard and of the alert rules is run through Prometheus' HTTP API: no panel
may come back empty on a healthy daemon.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from prometheus_util import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    DASHBOARD_JSON,
    DEPLOY,
    PROMETHEUS,
    PROMETHEUS_YML,
    PROMTOOL,
    PrometheusError,
    PrometheusServer,
)
from support import free_port, self_signed_cert, wait_until

pytestmark = pytest.mark.slow

LIVE_CAMERAS = ("cam-a", "cam-b")
DEAD_CAMERA = "dead"
EXPECTED_ALERTS = {
    "InspectdDown",
    "InspectdCameraDown",
    "InspectdInferenceFpsLow",
    "InspectdDroppedFrameRatioHigh",
    "InspectdStaleFrameRatioHigh",
    "InspectdEndToEndLatencyHigh",
    "InspectdEventsDropped",
    "InspectdRestarted",
    "InspectdReloadFailed",
    "InspectdArchiveLosingEntries",
    "InspectdClientKeyRefused",
    "InspectdPartsNotInspected",
}
# Alerts without `for:` that a healthy daemon must never fire.
QUIET_WHEN_HEALTHY = {
    "InspectdEventsDropped",
    "InspectdRestarted",
    "InspectdReloadFailed",
    "InspectdArchiveLosingEntries",
    "InspectdClientKeyRefused",
    "InspectdPartsNotInspected",
}


# ------------------------------------------------------------------------------------------ promtool
@pytest.mark.parametrize(
    "args",
    [("check", "config", PROMETHEUS_YML), ("check", "rules", ALERTS_YML), ("test", "rules", ALERTS_TEST_YML)],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args):
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    proc = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"


def test_every_alert_has_unit_tests_and_annotations():
    rules = ALERTS_YML.read_text()
    names = re.findall(r"^\s*- alert:\s*(\w+)", rules, re.M)
    assert set(names) == EXPECTED_ALERTS and len(names) == len(EXPECTED_ALERTS)
    tests = ALERTS_TEST_YML.read_text()
    for name in names:
        tested = re.findall(rf"alertname:\s*{name}\s*\n\s*exp_alerts:\s*(\[\])?", tests)
        assert any(t == "[]" for t in tested), f"{name}: no non-firing case in alerts_test.yml"
        assert any(t == "" for t in tested), f"{name}: no firing case in alerts_test.yml"
    for block in re.split(r"^\s*- alert:", rules, flags=re.M)[1:]:
        assert re.search(r"severity:\s*(critical|warning|info)", block), block
        assert "summary:" in block and "description:" in block and "$labels" in block, block


# ------------------------------------------------------------------------------------------ the dashboard
def _dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included (rows themselves excluded)."""
    out = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def _panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in _panels(dashboard)
        for t in p.get("targets", [])
        if not t.get("hide")
    ]


def _annotation_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of the annotation queries: events (restarts), empty while nothing happens."""
    return [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"] if a.get("expr")]


def _grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus query: (a|b), regex-escaped."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def render(expr: str, variables: dict[str, str]) -> str:
    """Substitute Grafana's $var / ${var} like Grafana does; an unknown variable is an error."""

    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"unknown variable ${name} in {expr}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def test_dashboard_structure():
    d = _dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "line", "instance", "camera"]  # the order
    for name, query in (
        ("line", "label_values(inspectd_build_info, line)"),  # each depends on the ones before
        ("instance", 'label_values(inspectd_build_info{line=~"$line"}, instance)'),
        ("camera", 'label_values(inspectd_camera_up{instance=~"$instance"}, camera)'),
    ):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        stored = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]  # Grafana 10 writes an object
        assert v["definition"] == query and stored == query, name
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
    panels = _panels(d)
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in d["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert len(panels) >= 20
    for p in panels:
        where = f"panel {p['id']} {p.get('title')!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p.get("targets"), f"{where}: no targets"
        assert p.get("title") and set(p["gridPos"]) == {"h", "w", "x", "y"}, where
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, where
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert t["expr"].strip(), where
            # Rates over the panel's interval: Grafana's $__rate_interval, never a hard-coded window.
            for window in re.findall(r"\[([^\]]+)\]", t["expr"]):
                assert window in ("$__rate_interval", "$__range"), f"{where}: window [{window}] in {t['expr']}"
            assert re.search(r'instance=~"\$instance"', t["expr"]), f"{where}: not filtered by $instance"
    # The panels the operator needs (docs/monitoring.md lists them).
    text = json.dumps(d)
    for metric in (
        "inspectd_frames_inferred_total",
        "inspectd_frames_captured_total",
        "inspectd_frames_dropped_total",
        "inspectd_defects_total",
        "inspectd_score_bucket",
        "inspectd_inference_seconds_bucket",
        "inspectd_end_to_end_seconds_bucket",
        "inspectd_batch_size_bucket",
        "inspectd_batch_size_sum",
        "inspectd_camera_up",
        "inspectd_camera_reconnects_total",
        "inspectd_events_published_total",
        "inspectd_events_dropped_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "inspectd_model_info",
        "inspectd_camera_info",
        "inspectd_build_info",
        "inspectd_reload_failures_total",
    ):
        assert metric in text, f"no panel uses {metric}"
    types = {p["type"] for p in panels}
    assert {"timeseries", "stat", "heatmap", "state-timeline", "table", "bargauge"} <= types


# ------------------------------------------------------------------------------------------ live stack
@dataclass
class Stack:
    prom: PrometheusServer
    daemon: DaemonProcess
    instance: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request) -> Stack:
    """A daemon (2 synthetic cameras + 1 dead, results published) scraped every 1 s by a real Prometheus."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    cams = "".join(
        camera_toml(c, f"synthetic://?fps=8&width=320&height=240&defect_rate=0.5&seed={i + 1}")
        for i, c in enumerate(LIVE_CAMERAS)
    )
    cams += camera_toml(
        DEAD_CAMERA, f"rtsp://127.0.0.1:{free_port()}/x", reconnect_initial_s=0.2, reconnect_max_s=1, open_timeout_s=1
    )
    config, urls = daemon_config(tmp, cams, publish={"results": True}, archive={"dir": str(tmp / "archive")})
    instance = urls["metrics"].removeprefix("http://")
    daemon = DaemonProcess(config, tmp / "daemon.log")
    request.addfinalizer(daemon.terminate)
    prom = PrometheusServer(tmp / "prom", targets=[instance], rule_files=[ALERTS_YML], labels={"line": "test"})
    request.addfinalizer(prom.stop)
    prom.start()  # while the daemon warms up its model
    prom.wait_ready()
    daemon.wait_ready(urls["metrics"])
    # Bounded: both live cameras inspected, and enough 1 s scrapes for 5 s rate windows.
    seen = {}

    def has_data() -> bool:
        seen["inferred"] = prom.query('count(rate(inspectd_frames_inferred_total{job="inspectd"}[5s]) > 0)')
        seen["scrapes"] = prom.query('count_over_time(inspectd_camera_up{job="inspectd", camera="dead"}[30s])')
        return all(seen[k] and float(seen[k][0]["value"][1]) >= n for k, n in (("inferred", 2), ("scrapes", 6)))

    wait_until(
        has_data,
        60,
        lambda: (
            f"both cameras inspected and 6 scrapes in Prometheus ({seen})\nprometheus:\n{prom.log()}\ndaemon:\n{daemon.log()}"
        ),
        interval=0.5,
    )
    return Stack(prom, daemon, instance)


def _variables(stack: Stack, cameras, rate_interval: str) -> dict[str, str]:
    return {
        "instance": _grafana_regex([stack.instance]),
        "camera": _grafana_regex(list(cameras)),
        "__rate_interval": rate_interval,
        "__range": "5m",
        "__interval": "1s",
        "datasource": "prometheus",
    }


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_dashboard_query_returns_data(stack):
    """Every panel's query, with the variables as Grafana fills them, returns a finite value."""
    exprs = _panel_exprs(_dashboard())
    assert len(exprs) >= 25
    variants = {  # at 1 s scrapes a 5 s window holds >= 4 samples, like $__rate_interval = 4 x scrape interval
        "both live cameras, [5s]": _variables(stack, LIVE_CAMERAS, "5s"),
        "all cameras, [5s]": _variables(stack, (*LIVE_CAMERAS, DEAD_CAMERA), "5s"),
    }
    deadline = time.monotonic() + 30
    while True:  # counters touched late (stale drops, the first defect) may need a few more scrapes
        empty = []
        for variant, variables in variants.items():
            for where, expr in exprs:
                q = render(expr, variables)
                if not _finite(stack.prom.query(q)):
                    empty.append(f"{where} [{variant}]: {q}")
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, "dashboard queries with no data on a healthy daemon:\n" + "\n".join(empty)
    # At a 15 s scrape interval Grafana's $__rate_interval is 1m: the same panels, still with data.
    for where, expr in exprs:
        q = render(expr, _variables(stack, LIVE_CAMERAS, "1m"))
        assert _finite(stack.prom.query(q)), f"{where}: no data at [1m]: {q}"
    # Annotation queries mark events (restarts): they must run; empty is right on a daemon that never restarted.
    for where, expr in _annotation_exprs(_dashboard()):
        for window in ("5s", "1m"):
            q = render(expr, _variables(stack, LIVE_CAMERAS, window))
            try:
                assert stack.prom.query(q) == [], f"{where}: a restart on a daemon that never restarted: {q}"
            except PrometheusError as e:
                pytest.fail(f"{where}: {e}")


def _variable_values(prom: PrometheusServer, name: str, variables: dict[str, str]) -> set[str]:
    """What Grafana lists for the dashboard variable `name`, with the other variables set to `variables`."""
    definition = {v["name"]: v for v in _dashboard()["templating"]["list"]}[name]["definition"]
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", definition)
    assert m, definition
    return set(prom.label_values(m.group(2), render(m.group(1), variables)))


def test_dashboard_variables_list_the_daemon_and_its_cameras(stack):
    variables = {"line": ".*", "instance": _grafana_regex([stack.instance])}
    assert _variable_values(stack.prom, "line", variables) == {"test"}
    assert _variable_values(stack.prom, "instance", variables) == {stack.instance}
    assert _variable_values(stack.prom, "camera", variables) == {*LIVE_CAMERAS, DEAD_CAMERA}


def test_file_sd_with_a_line_label_feeds_the_dashboard_variables_for_two_daemons(tmp_path):
    """The shipped scrape layout (file_sd_configs, one targets file per line with a `line` label) on a real
    Prometheus scraping two daemons: $line lists both lines, $instance the daemon of the chosen line, $camera
    that daemon's cameras only."""
    daemons = {}
    for line, camera in (("line1", "l1-top"), ("line2", "l2-top")):
        folder = tmp_path / line
        folder.mkdir()
        config, urls = daemon_config(folder, camera_toml(camera, "synthetic://?fps=4&width=160&height=128&seed=1"))
        daemons[line] = (DaemonProcess(config, folder / "daemon.log"), urls["metrics"].removeprefix("http://"), camera)
    shipped = tmp_path / "prometheus"  # deploy/prometheus as installed: the config, its rules, targets/
    shutil.copytree(DEPLOY / "prometheus", shipped)
    (shipped / "targets" / "local.yml").unlink()
    for line, (_, instance, _) in daemons.items():  # what configuration management writes, per line
        (shipped / "targets" / f"{line}.yml").write_text(f'- targets: ["{instance}"]\n  labels:\n    line: {line}\n')
    try:
        with PrometheusServer(tmp_path / "prom", targets=[], config_file=shipped / "prometheus.yml") as prom:
            prom.wait_ready()
            for daemon, instance, _ in daemons.values():
                daemon.wait_ready(f"http://{instance}")
            # The shipped scrape interval is 15 s: the first scrape of each target comes within it.
            wait_until(
                lambda: _variable_values(prom, "line", {}) == {"line1", "line2"},
                60,
                lambda: f"both lines in Prometheus: {prom.targets()}",
            )
            for line, (_, instance, camera) in daemons.items():
                chosen = {"line": line, "instance": _grafana_regex([instance])}
                assert _variable_values(prom, "instance", chosen) == {instance}
                wait_until(lambda c=chosen, cam=camera: _variable_values(prom, "camera", c) == {cam}, 30, f"{line}: camera")
            both = {"line": "(line1|line2)", "instance": ".*"}
            assert _variable_values(prom, "instance", both) == {i for _, i, _ in daemons.values()}
    finally:
        for daemon, _, _ in daemons.values():
            daemon.terminate()


def test_alert_rules_load_and_evaluate(stack):
    """alerts.yml loads into the server; every rule's expression runs on live data; a healthy daemon is quiet."""
    rules = stack.prom.rules()
    assert {r["name"] for r in rules if r["type"] == "alerting"} == EXPECTED_ALERTS
    for rule in rules:
        try:
            stack.prom.query(rule["query"])
        except PrometheusError as e:
            pytest.fail(f"{rule['name']}: {e}")
    # The dead camera's alert is on its way (pending: for 1m), computed from the live series.
    wait_until(
        lambda: any(
            a["labels"]["alertname"] == "InspectdCameraDown" and a["labels"].get("camera") == DEAD_CAMERA
            for a in stack.prom.alerts()
        ),
        20,
        lambda: f"InspectdCameraDown pending for camera {DEAD_CAMERA!r}: {stack.prom.alerts()}",
        interval=0.5,
    )
    for rule in stack.prom.rules():
        assert rule["health"] == "ok", rule
        for a in rule.get("alerts", []):
            assert a["labels"].get("camera") in (None, DEAD_CAMERA), a  # nothing about the live cameras
            assert a["labels"]["alertname"] not in QUIET_WHEN_HEALTHY, a
    # The live cameras are up, inspected, and not alerted on.
    up = {s["metric"]["camera"]: float(s["value"][1]) for s in stack.prom.query('inspectd_camera_up{job="inspectd"}')}
    assert up == {"cam-a": 1.0, "cam-b": 1.0, DEAD_CAMERA: 0.0}


@pytest.mark.parametrize("name", ["inspectd_end_to_end_seconds", "inspectd_inference_seconds", "inspectd_score"])
def test_histogram_quantile_matches_prometheus(stack, name):
    """`inspectd bench` and benchmarks/performance.py compute quantiles from buckets themselves: on the same
    samples (one evaluation time, every camera's label set summed), they equal Prometheus' own."""
    from inspectd.bench import histogram_quantile

    at = time.time() - 1  # a moment Prometheus has scraped: both queries see the same samples
    samples = stack.prom.query(f'{name}_bucket{{job="inspectd"}}', at=at)
    buckets = [(float(s["metric"]["le"]), float(s["value"][1])) for s in samples]
    assert len({le for le, _ in buckets}) > 3 and max(c for _, c in buckets) > 0, samples
    for q in (0.1, 0.5, 0.9, 0.99):
        theirs = stack.prom.query(f'histogram_quantile({q}, sum by (le) ({name}_bucket{{job="inspectd"}}))', at=at)
        assert histogram_quantile(buckets, q) == pytest.approx(float(theirs[0]["value"][1]), abs=1e-4), (q, buckets)


# ------------------------------------------------------------------------------ HTTPS and basic auth
def test_prometheus_scrapes_over_https_with_basic_auth_and_nothing_else_gets_in(tmp_path):
    """A real Prometheus scrapes a metrics server with `[metrics] tls_*` and `basic_auth_users` set: the job
    with the CA and the password is up; a wrong password, plain HTTP or no CA are down, each for its reason."""
    from prometheus_client import CollectorRegistry

    from inspectd.config import MetricsConfig
    from inspectd.metrics import Metrics
    from inspectd.security import hash_password
    from inspectd.service.metrics import MetricsServer
    from inspectd.service.web import web_security

    cert, key = self_signed_cert(tmp_path)
    cfg = MetricsConfig(
        tls_cert_file=str(cert), tls_key_file=str(key), basic_auth_users={"prometheus": hash_password("scrape-me", rounds=10)}
    )
    metrics = Metrics(CollectorRegistry())
    metrics.frames_captured.labels(camera="tls-cam").inc(7)
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, lambda: (True, "ok"), lambda: (True, "ok"), web=web_security(cfg))
    server.start()
    target = f"127.0.0.1:{server.port}"

    def job(name: str, **options) -> dict:
        return {"job_name": name, "static_configs": [{"targets": [target]}], **options}

    tls = {"scheme": "https", "tls_config": {"ca_file": str(cert)}}
    jobs = [
        job("secured", **tls, basic_auth={"username": "prometheus", "password": "scrape-me"}),
        job("wrong-password", **tls, basic_auth={"username": "prometheus", "password": "guess"}),
        job("plain-http", basic_auth={"username": "prometheus", "password": "scrape-me"}),
        job("unknown-ca", scheme="https", basic_auth={"username": "prometheus", "password": "scrape-me"}),
    ]
    try:
        with PrometheusServer(tmp_path / "prom", targets=[], jobs=jobs) as prom:
            prom.wait_ready()

            def health() -> dict[str, tuple[str, str]]:
                return {
                    t["labels"]["job"]: (t["health"], t["lastError"]) for t in prom.targets() if t["labels"]["job"] != "inspectd"
                }

            wait_until(
                lambda: all(h != "unknown" for h, _ in health().values()) and len(health()) == 4,
                30,
                lambda: f"every job scraped once: {health()}",
            )
            found = health()
            assert found["secured"] == ("up", ""), found
            assert found["wrong-password"][0] == "down" and "401" in found["wrong-password"][1], found
            assert found["plain-http"][0] == "down", found
            assert found["unknown-ca"][0] == "down" and "certificate" in found["unknown-ca"][1], found
            wait_until(
                lambda: prom.query('inspectd_frames_captured_total{camera="tls-cam",job="secured"}'),
                30,
                "the secured job's samples in Prometheus",
            )
            assert float(prom.query('inspectd_frames_captured_total{job="secured"}')[0]["value"][1]) == 7
    finally:
        server.stop()
