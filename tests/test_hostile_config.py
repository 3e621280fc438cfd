"""Configurations that check-config used to pass and the daemon then could not run (found from outside,
issue 23): each is now exit 78 at check-config with one line naming the key or variable. In-process (the
entry point `inspectd` runs), so each case costs milliseconds; test_check_config.py has the subprocess ones.

The numbers' edges: a hypothesis test draws every numeric key at, just inside and just outside its
declared range and checks that whatever check-config accepts is a value the daemon can run with."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspectd.config import CameraConfig, ModelEntry, Settings

CAMERA = '[[cameras]]\nid = "a"\nurl = "synthetic://?fps=5"\n'


def check_config(tmp_path: Path, monkeypatch, capsys, text: str, env: dict | None = None) -> tuple[int, list[str]]:
    """`inspectd check-config --no-model` on `text` with only `env` for INSPECTD_* variables: (exit code, stderr lines)."""
    from inspectd.cli import main

    path = tmp_path / "c.toml"
    path.write_text(text)
    capsys.readouterr()
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.upper().startswith("INSPECTD_")]:
            m.delenv(name)
        for name, value in (env or {}).items():
            m.setenv(name, value)
        m.chdir(tmp_path)
        code = main(["check-config", "--no-model", "--config", str(path)])
    return code, [line for line in capsys.readouterr().err.splitlines() if ": WARNING: " not in line]


def refused(tmp_path, monkeypatch, capsys, text: str, *needles: str, env: dict | None = None) -> str:
    code, lines = check_config(tmp_path, monkeypatch, capsys, text, env)
    assert code == 78 and len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "internal error" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[daemon]\nshutdown_timeout_s = 1e300\n", ("daemon.shutdown_timeout_s",)),
        ("[publish]\nheartbeat_s = 1e-300\n", ("publish.heartbeat_s",)),
        ("[daemon]\nstuck_after_s = 1e-300\n", ("daemon.stuck_after_s",)),
        ("[ui]\nenabled = true\nport = 9200\n[metrics]\nport = 9200\n", ("ui.port", "metrics.port")),
        ('[replay]\nendpoint = "tcp://127.0.0.1:5556"\n[publish]\nendpoint = "tcp://127.0.0.1:5556"\n', ("replay.endpoint",)),
        ('[replay]\nendpoint = "tcp://*:5600"\n[publish]\nendpoint = "tcp://127.0.0.1:5600"\n', ("replay.endpoint",)),
    ],
    ids=["shutdown-1e300", "heartbeat-1e-300", "stuck-1e-300", "ui-port-is-metrics-port", "replay-is-publish", "any-host"],
)
def test_a_value_the_daemon_cannot_run_with_is_refused(tmp_path, monkeypatch, capsys, text, needles):
    refused(tmp_path, monkeypatch, capsys, text + CAMERA, *needles)


def test_endless_reconnect_delays_are_refused(tmp_path, monkeypatch, capsys):
    camera = CAMERA + "reconnect_initial_s = 1e300\nreconnect_max_s = 1e300\n"
    refused(tmp_path, monkeypatch, capsys, camera, "reconnect_initial_s")


def test_an_empty_camera_url_is_refused_not_read_as_the_config_folder(tmp_path, monkeypatch, capsys):
    refused(tmp_path, monkeypatch, capsys, '[[cameras]]\nid = "a"\nurl = ""\n', "url is empty")


@pytest.mark.parametrize("url", ["missing.mp4", "file://{tmp}/missing.mp4", "dir://{tmp}/nothing?fps=2", "{tmp}/c.toml/x"])
def test_a_file_or_folder_source_that_is_not_there_is_refused(tmp_path, monkeypatch, capsys, url):
    url = url.format(tmp=tmp_path)
    refused(tmp_path, monkeypatch, capsys, f'[[cameras]]\nid = "a"\nurl = "{url}"\n', "cameras[a].url", "no such")


def test_a_folder_source_that_is_there_passes(tmp_path, monkeypatch, capsys):
    (tmp_path / "frames").mkdir()
    text = f'[[cameras]]\nid = "a"\nurl = "dir://{tmp_path}/frames?fps=2"\n[[cameras]]\nid = "b"\nurl = "frames"\n'
    assert check_config(tmp_path, monkeypatch, capsys, text) == (0, [])


def test_an_archive_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "archive").write_text("not a folder")
    refused(tmp_path, monkeypatch, capsys, '[archive]\ndir = "archive"\n' + CAMERA, "archive.dir", "is a file")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"INSPECTD_CAMERAS": "[" * 100_000 + "]" * 100_000}, ("INSPECTD_CAMERAS", "nested too deeply")),
        ({"INSPECTD_UI__BASIC_AUTH_USERS": "{bad"}, ("INSPECTD_UI__BASIC_AUTH_USERS", "not valid JSON")),
        ({"INSPECTD_ARCHIVE": "null"}, ("INSPECTD_ARCHIVE", "null given", "JSON object")),
        ({"INSPECTD_CAMERAS": '{"id": "a"}'}, ("INSPECTD_CAMERAS", "dict given", "JSON list")),
    ],
    ids=["deep-cameras", "bad-users-json", "archive-null", "cameras-object"],
)
def test_environment_variables_are_named_in_their_errors(tmp_path, monkeypatch, capsys, env, needles):
    refused(tmp_path, monkeypatch, capsys, CAMERA, *needles, env=env)


# -- every number at its edges -----------------------------------------------------------------------------------


def _numeric_keys(tables: bool = False) -> list[tuple[str, str, float | None, float | None, type]]:
    """(section, key, lowest allowed, highest allowed, int or float) of every numeric key outside [[cameras]] and
    [[models]] (with `tables`, of a camera's and a model's table)."""
    keys = []
    sections = (
        {"cameras": CameraConfig, "models": ModelEntry} if tables else {s: f.annotation for s, f in Settings.model_fields.items()}
    )
    for section, model in sections.items():
        if section in ("cameras", "models") and not tables:
            continue
        for key, info in model.model_fields.items():  # type: ignore[union-attr]
            if info.annotation not in (int, float):
                continue
            low = high = None
            for m in info.metadata:
                low = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else low
                low = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else low
                high = getattr(m, "le", None) if getattr(m, "le", None) is not None else high
                high = getattr(m, "lt", None) if getattr(m, "lt", None) is not None else high
            keys.append((section, key, low, high, info.annotation))
    return keys


NUMERIC = _numeric_keys()


def test_every_number_has_a_range():
    """No numeric key is unbounded: 1e300 or 1e-300 is refused wherever the daemon would overflow or spin."""
    unbounded = [f"{s}.{k}" for s, k, low, high, _ in NUMERIC + _numeric_keys(tables=True) if low is None or high is None]
    assert unbounded == []


def _edges(low: float, high: float, kind: type) -> list[float]:
    step = 1 if kind is int else max(abs(low), abs(high), 1) * 1e-9
    return [low - step, low, low + step, high - step, high, high + step, -1e300, 1e300, math.inf, math.nan]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_numbers_at_the_edges_of_their_ranges(tmp_path_factory, monkeypatch, capsys, data):
    section, key, low, high, kind = data.draw(st.sampled_from(NUMERIC))
    value = data.draw(st.sampled_from(_edges(low, high, kind)))
    if kind is int and math.isfinite(value):
        value = int(value)
    literal = "nan" if math.isnan(value) else ("inf" if value == math.inf else repr(value))
    tmp = tmp_path_factory.mktemp("edge")
    code, lines = check_config(tmp, monkeypatch, capsys, f"[{section}]\n{key} = {literal}\n" + CAMERA)
    inside = math.isfinite(value) and low <= value <= high and not (kind is int and value != int(value))
    if code == 0:
        assert inside, f"{section}.{key} = {literal} passed check-config outside [{low}, {high}]"
    else:
        assert code == 78 and len(lines) == 1 and f"{section}.{key}" in lines[0], (literal, lines)


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_without_config_and_without_etc_config_nothing_starts(tmp_path, monkeypatch, capsys, command):
    """A fresh install's service started before its config is written must not run the demo (synthetic
    defects on the line's event port): one line naming the path it looked for, exit 78."""
    from inspectd.cli import main

    monkeypatch.setattr("inspectd.config.DEFAULT_CONFIG", tmp_path / "etc" / "config.toml")
    capsys.readouterr()
    code = main([command])
    err = capsys.readouterr().err.splitlines()
    assert code == 78 and len(err) == 1 and f"{tmp_path / 'etc' / 'config.toml'} not found" in err[0], err
