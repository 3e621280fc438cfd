"""State first, metrics as output: the counts the daemon reads are plain `Tally` state that Prometheus exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inspectd.metrics import Metrics, Tally, accounts, frame_accounts

PACKAGE = Path(__file__).resolve().parents[1] / "inspectd"


def test_a_tally_counts_by_labels_and_is_exported_as_a_counter():
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.frames_captured.labels(camera="a").inc(5)
    m.frames_inferred.labels(camera="a").inc(3)
    m.frames_dropped.labels(camera="a", reason="stale").inc(2)
    m.frames_dropped.labels(camera="b", reason="decode")  # a series exists at 0 once labelled
    m.camera_reconnects.labels(camera="b").inc()
    assert m.frames_dropped.total() == 2 and m.frames_dropped.total(reason="stale") == 2
    assert m.frames_dropped.total(camera="b") == 0 and m.camera_reconnects.values() == {("b",): 1.0}
    # What a scraper sees equals the state.
    assert registry.get_sample_value("inspectd_frames_captured_total", {"camera": "a"}) == 5
    assert registry.get_sample_value("inspectd_frames_dropped_total", {"camera": "b", "reason": "decode"}) == 0
    assert (
        [str(a) for a in accounts(m, {"a": 0})]
        == [str(a) for a in frame_accounts(registry, {"a": 0})]
        == [
            "a: captured 5 = inferred 3 + dropped 2 (stale 2) + in flight 0; residual 0",
            "b: captured 0 = inferred 0 + dropped 0 (none) + in flight 0; residual 0",
        ]
    )


def test_a_tally_refuses_wrong_labels_and_a_decrease():
    t = Tally("x", "x", ("camera",))
    with pytest.raises(ValueError, match="labels"):
        t.labels(cam="a")
    with pytest.raises(ValueError, match="only grows"):
        t.labels(camera="a").inc(-1)
    assert t.total() == 0


def _reads_the_registry(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("get_sample_value", "collect"):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    return found


def test_the_daemon_never_reads_metrics_back_as_state():
    """No stage reads the registry (client_python documents get_sample_value for unit tests)."""
    daemon = [p for sub in ("service", "pipeline", "sources", "outputs") for p in (PACKAGE / sub).rglob("*.py")]
    assert [hit for p in daemon for hit in _reads_the_registry(p)] == []
    assert _reads_the_registry(Path(__file__).with_name("test_pipeline.py"))  # the check sees such a call
