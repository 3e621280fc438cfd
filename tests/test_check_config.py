"""Bad configurations found by a hostile tester: each is one line naming the key or variable, exit 78.

Or the model-file codes of `run` (66 missing, 65 not a model). `check-config` finds all of them but a
port in use, which only `run` can find (the running daemon holds its own ports while an operator
checks a new config before a reload). The property test at the end feeds random TOML documents and
INSPECTD_* variables to the in-process entry point: exit 0 or a documented code, one line, never a
traceback.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import string
import zipfile
from pathlib import Path

import pytest
from conftest import Run, run_cli
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from support import ROOT, free_port

from inspectd.config import NON_CONFIG_ENV, config_env_names, load_settings
from inspectd.errors import ConfigError

CAMERA = '[[cameras]]\nid = "a"\nurl = "synthetic://?fps=5"\n'
DEMO_MODEL = ROOT / "inspectd" / "assets" / "demo.keras"


def _write(tmp_path: Path, text: str | bytes, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _one_line_error(run: Run, code: int, *needles: str) -> str:
    """The run failed with `code` and exactly one line on stderr that contains every needle."""
    lines = run.stderr.splitlines()
    assert run.returncode == code, run.stderr
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def check(tmp_path: Path, text: str | bytes, *extra: str, env: dict | None = None) -> Run:
    return run_cli("check-config", "--no-model", *extra, "--config", _write(tmp_path, text), env=env)


# ----------------------------------------------------------------------------- publish.endpoint


def test_publish_port_out_of_range_is_refused(tmp_path):
    run = check(tmp_path, '[publish]\nendpoint = "tcp://127.0.0.1:99999"\n' + CAMERA)
    _one_line_error(run, 78, "publish.endpoint", "99999", "1-65535")


@pytest.mark.parametrize(
    "endpoint,needle",
    [
        ("tcp://127.0.0.1", "tcp://HOST:PORT"),
        ("tcp://127.0.0.1:-1", "not a TCP port"),
        ("tcp://127.0.0.1:", "not a TCP port"),
        ("tcp://:5556", "tcp://HOST:PORT"),
        ("tcp://not a host!!:5556", "not an IP address or a host name"),
        ("tcp://[::1]:5556", "IPv6"),
        ("udp://127.0.0.1:5556", "tcp://HOST:PORT or ipc://PATH"),
        ("ipc://", "ipc path"),
        ("ipc:///" + "x" * 200, "ipc path"),
    ],
)
def test_bad_endpoints_name_the_key(tmp_path, endpoint, needle):
    with pytest.raises(ConfigError) as exc:
        load_settings(_write(tmp_path, f'[publish]\nendpoint = "{endpoint}"\n' + CAMERA))
    assert "publish.endpoint" in str(exc.value) and needle in str(exc.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5556",
        "tcp://*:5556",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:*",
        "tcp://localhost:5556",
        "tcp://lo:5556",
        "ipc:///run/inspectd/events",
        "ipc://@x",
    ],
)
def test_good_endpoints_pass(tmp_path, endpoint):
    assert load_settings(_write(tmp_path, f'[publish]\nendpoint = "{endpoint}"\n' + CAMERA)).publish.endpoint == endpoint


# ----------------------------------------------------------------------------- metrics.host / metrics.port


def test_metrics_host_that_is_not_a_host_is_refused(tmp_path):
    run = check(tmp_path, '[metrics]\nhost = "not a host!!"\n' + CAMERA)
    _one_line_error(run, 78, "metrics.host", "not a host!!")


@pytest.mark.parametrize(
    "host,ok",
    [
        ("127.0.0.1", True),
        ("0.0.0.0", True),
        ("::1", True),
        ("localhost", True),
        ("", False),
        ("no-such-host.invalid", False),
        ("a b", False),
    ],
)
def test_metrics_host_is_an_address_or_a_name_that_resolves(tmp_path, host, ok):
    path = _write(tmp_path, f'[metrics]\nhost = "{host}"\n' + CAMERA)
    if ok:
        assert load_settings(path).metrics.host == host
    else:
        with pytest.raises(ConfigError, match="metrics.host"):
            load_settings(path)


def test_metrics_port_in_use_fails_run_naming_the_key(tmp_path):
    """Only `run` can find it. The port is held by a real listening socket for the whole run."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _write(tmp_path, f'[metrics]\nport = {port}\n[publish]\nendpoint = "tcp://127.0.0.1:{free_port()}"\n' + CAMERA)
        run = run_cli("run", "--config", config, "--log-level", "error", timeout=120)
    _one_line_error(run, 78, "metrics.port", f"127.0.0.1:{port}", "in use")


# ----------------------------------------------------------------------------- the file and the environment


def test_a_config_that_is_not_utf8_is_refused(tmp_path):
    run = check(tmp_path, b'[model]\npath = "caf\xe9.keras"\n' + CAMERA.encode())
    _one_line_error(run, 78, "c.toml", "not UTF-8 text", "0xe9 on line 2")


def test_a_utf8_bom_is_accepted(tmp_path):
    assert load_settings(_write(tmp_path, b"\xef\xbb\xbf" + CAMERA.encode())).cameras[0].id == "a"


def test_camera_list_from_the_environment_that_is_not_json(tmp_path):
    run = check(tmp_path, CAMERA, env={"INSPECTD_CAMERAS": "notjson"})
    line = _one_line_error(run, 78, "INSPECTD_CAMERAS", "not valid JSON")
    assert "c.toml" not in line


def test_a_bad_env_override_is_reported_as_the_variable_not_the_file(tmp_path):
    run = check(tmp_path, "[model]\nthreshold = 0.5\n" + CAMERA, env={"INSPECTD_MODEL__THRESHOLD": "2"})
    line = _one_line_error(run, 78, "INSPECTD_MODEL__THRESHOLD", "model.threshold", "'2'")
    assert "c.toml" not in line


def test_errors_from_the_file_and_the_environment_each_name_their_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTD_CAMERAS", '[{"id": "a", "url": "x", "roi": [0, 0, 0, 5]}]')
    with pytest.raises(ConfigError) as exc:
        load_settings(_write(tmp_path, "[model]\nthreshold = 7\n"))
    msg = str(exc.value)
    assert re.search(r"c\.toml: model\.threshold: .*INSPECTD_CAMERAS: cameras\.0\.roi: ", msg), msg


def test_a_misspelled_key_in_a_variable_is_an_error_naming_the_closest_variable(tmp_path):
    run = check(tmp_path, CAMERA, env={"INSPECTD_MODEL__TRESHOLD": "0.2"})
    _one_line_error(run, 78, "INSPECTD_MODEL__TRESHOLD", "did you mean INSPECTD_MODEL__THRESHOLD?")


def test_a_misspelled_section_variable_is_warned_about_naming_the_closest(tmp_path):
    """pydantic-settings ignores a variable whose section does not exist: inspectd warns instead of staying silent."""
    run = check(tmp_path, CAMERA, env={"INSPECTD_MODLE__PATH": "/x.keras"})
    assert run.returncode == 0, run.stderr
    assert "INSPECTD_MODLE__PATH" in run.stderr and "did you mean INSPECTD_MODEL__PATH?" in run.stderr


def test_variables_inspectd_uses_that_are_not_config_are_not_warned_about(tmp_path, monkeypatch, caplog):
    for name in NON_CONFIG_ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("INSPECTD_MODEL__THRESHOLD", "0.4")
    with caplog.at_level(logging.WARNING, logger="inspectd.config"):
        assert load_settings(_write(tmp_path, CAMERA)).model.threshold == 0.4
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_every_inspectd_variable_in_the_repository_is_config_or_known():
    """A new INSPECTD_* variable in the code or the scripts must be added to NON_CONFIG_ENV (or it gets warned about).

    The docs are not scanned: they show misspelled variables on purpose."""
    known = set(config_env_names()) | NON_CONFIG_ENV
    files = [
        p
        for d in ("inspectd", "scripts", "deploy", "benchmarks")
        for p in (ROOT / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".sh", ".service", ".toml", ".yml", "")
    ]
    files += [ROOT / "config.example.toml"]
    found = {m for p in files for m in re.findall(r"\bINSPECTD_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="replace"))}
    assert {"INSPECTD_DEBUG", "INSPECTD_MODEL__THRESHOLD"} <= found  # the scan sees both kinds
    assert found <= known, sorted(found - known)


# ----------------------------------------------------------------------------- cameras


def test_a_negative_roi_is_refused(tmp_path):
    run = check(tmp_path, '[[cameras]]\nid = "a"\nurl = "synthetic://"\nroi = [-10, -10, 0, 0]\n')
    _one_line_error(run, 78, "cameras.0.roi", "x, y >= 0 and w, h > 0", "[-10, -10, 0, 0]")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_zero_cameras_is_refused(tmp_path, command):
    config = _write(tmp_path, f'[metrics]\nport = {free_port()}\n[publish]\nendpoint = "tcp://127.0.0.1:{free_port()}"\n')
    run = run_cli(command, "--config", config, timeout=120)
    _one_line_error(run, 78, "cameras: no [[cameras]] configured; the daemon needs at least one camera")


def test_the_example_config_has_cameras():
    assert load_settings(ROOT / "config.example.toml").cameras


# ----------------------------------------------------------------------------- the model


def _model_config(tmp_path: Path, model: Path | str) -> Path:
    return _write(tmp_path, f'[model]\npath = "{model}"\n' + CAMERA)


def test_check_config_loads_the_model_and_says_what_it_is():
    run = run_cli("check-config", "--config", ROOT / "config.example.toml", timeout=300)
    assert run.returncode == 0, run.stderr
    assert '"line1-top"' in run.stdout
    model = run.stdout[run.stdout.index("# model builtin:demo") :]
    for needle in (
        "loaded in Keras safe mode",
        "name demo",
        "backbone efficientnet_lite0",
        "input 160x128",
        "outputs score [B], cam_logits [B, 8, 10], pooling gap",
        "thresholds score 0.5, mask rule minmax:0.85",
        "sha256 ",
    ):
        assert needle in model, model


def test_a_missing_model_fails_like_run(tmp_path):
    run = run_cli("check-config", "--config", _model_config(tmp_path, tmp_path / "missing.keras"))
    _one_line_error(run, 66, "model.path", "missing.keras: no such model file")


def test_a_model_path_that_is_a_folder_says_so(tmp_path):
    (tmp_path / "saved_model").mkdir()
    run = run_cli("check-config", "--config", _model_config(tmp_path, tmp_path / "saved_model"))
    _one_line_error(run, 65, "model.path", "is a folder, not a model file")


@pytest.mark.parametrize("content", [b"hello", "half"], ids=["not-a-model", "truncated"])
def test_a_file_that_is_not_a_model_fails_like_run(tmp_path, content):
    data = DEMO_MODEL.read_bytes()
    (tmp_path / "m.keras").write_bytes(data[: len(data) // 2] if content == "half" else content)
    run = run_cli("check-config", "--config", _model_config(tmp_path, tmp_path / "m.keras"))
    _one_line_error(run, 65, "model.path", "m.keras")


def test_damaged_weights_inside_a_good_archive_fail_with_65(tmp_path, capsys, tf):
    """Metadata fine, weights garbage: only loading the model (as check-config now does) can find it."""
    from inspectd.cli import main

    bad = tmp_path / "m.keras"
    with zipfile.ZipFile(DEMO_MODEL) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"garbage" if item.filename.endswith(".h5") else src.read(item))
    assert main(["check-config", "--config", str(_model_config(tmp_path, bad))]) == 65
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.path" in err[0] and "cannot load the model safely" in err[0], err


def test_no_model_skips_loading(tmp_path):
    run = run_cli("check-config", "--no-model", "--config", _model_config(tmp_path, tmp_path / "missing.keras"))
    assert run.returncode == 0 and "not loaded (--no-model)" in run.stdout, run.stderr


# ----------------------------------------------------------------------------- property test

# Every key with a strategy for values it accepts; each drawn value is one of those most of the time, else
# anything (SCALARS), and junk keys turn up now and then: documents are often valid, often one error away.
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(-20, 400), max_size=5),
)
NUM, BOOL = st.floats(0.01, 100), st.booleans()
SECTIONS = {
    "model": {
        "path": st.sampled_from(["missing.keras", ""]),
        "threshold": st.floats(0, 1),
        "mask_threshold": st.floats(0, 1),
        "device": st.sampled_from(["auto", "cpu", "gpu:0"]),
        "mask_rule": st.sampled_from(["relative:2", "quantile:0.99", "minmax", "probability:0.7", "bogus:1"]),
        "precision": st.sampled_from(["float32", "mixed_float16"]),
        "xla": BOOL,
    },
    "batching": {"max_batch": st.one_of(st.just("auto"), st.integers(1, 256)), "max_wait_ms": st.floats(0, 1000)},
    "postprocess": {
        "mask_resolution": st.sampled_from(["frame", "cam"]),
        "workers": st.integers(1, 32),
        "min_region_px": st.integers(1, 99),
        "jpeg_quality": st.integers(10, 100),
    },
    "publish": {
        "endpoint": st.sampled_from(
            ["tcp://127.0.0.1:5556", "tcp://*:0", "tcp://localhost:*", "ipc:///tmp/e", "ipc://@inspectd"]
        ),
        "send_hwm": st.integers(1, 100_000),
        "heartbeat_s": NUM,
        "results": BOOL,
        "attach_frame": BOOL,
    },
    "metrics": {"host": st.sampled_from(["127.0.0.1", "::1", "localhost", "0.0.0.0"]), "port": st.integers(0, 65535)},
    "archive": {
        "dir": st.sampled_from(["", "archive", "/tmp/inspectd-archive"]),
        "max_bytes": st.integers(0, 2**40),
        "max_age_s": st.floats(0, 1e6),
        "frame_format": st.sampled_from(["jpeg", "png"]),
        "ok_every": st.integers(0, 100),
        "queue_size": st.integers(1, 100_000),
    },
    "daemon": {"shutdown_timeout_s": NUM, "warmup": BOOL, "stuck_after_s": NUM},
}
CAMERA_KEYS = {
    "url": st.sampled_from(["synthetic://", "rtsp://u:p@h/s", "x.mp4", "dir:///tmp"]),
    "backend": st.sampled_from(["auto", "opencv", "gstreamer"]),
    "fps_limit": st.floats(0, 60),
    "loop": BOOL,
    "roi": st.tuples(st.integers(0, 400), st.integers(0, 400), st.integers(1, 400), st.integers(1, 400)).map(list),
    "resize": st.tuples(st.integers(16, 640), st.integers(16, 480)).map(list),
    "reconnect_initial_s": st.floats(0.01, 1),
    "reconnect_max_s": st.floats(1, 60),
    "stall_timeout_s": NUM,
    "open_timeout_s": NUM,
}
JUNK_KEYS = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
RARELY = st.sampled_from([False] * 9 + [True])  # (hypothesis leans to small integers: integers(0, 9) == 0 is no 10 %)


def _maybe_bad(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value the key accepts, one in five anything at all."""
    return st.sampled_from([False] * 4 + [True]).flatmap(lambda bad: SCALARS if bad else valid)


@st.composite
def _table(draw, keys: dict, required: dict | None = None) -> dict:
    chosen = draw(st.lists(st.sampled_from(sorted(keys)), max_size=3, unique=True))
    table = {**(required or {}), **{k: draw(_maybe_bad(keys[k])) for k in chosen}}
    if draw(RARELY):
        table[draw(JUNK_KEYS)] = draw(SCALARS)
    return table


@st.composite
def documents(draw) -> dict:
    """A config document: some sections, usually one or two cameras, now and then a junk key."""
    doc = {name: draw(_table(keys)) for name, keys in SECTIONS.items() if draw(st.booleans())}
    count = draw(st.sampled_from([1, 1, 1, 2, 0]))
    ids = [draw(st.sampled_from(["a", "line1-top", "b", "a", "Top Cam"])) for _ in range(count)]
    doc["cameras"] = [draw(_table(CAMERA_KEYS, {"id": i, "url": "synthetic://"})) for i in ids]
    if draw(RARELY):
        doc[draw(JUNK_KEYS)] = draw(SCALARS)
    return doc


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in v) + '"'


def _tables(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def render_toml(doc: dict) -> str:
    """The document as TOML text: top-level values, then [section] tables, then arrays of tables ([[cameras]])."""
    out = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict) and not _tables(v)]
    for name, table in doc.items():
        if isinstance(table, dict):
            out += [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for name, tables in doc.items():
        if _tables(tables):
            for table in tables:
                out += [f"[[{name}]]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


ENV_NAMES = st.one_of(
    st.sampled_from(config_env_names()),
    st.sampled_from(
        [
            "INSPECTD_MODLE__PATH",
            "INSPECTD_MODEL__TRESHOLD",
            "INSPECTD_CAMERAS__0__ID",
            "INSPECTD_MODEL__THRESHOLD__X",
            "INSPECTD_",
            "INSPECTD_DEBUGG",
        ]
    ),
    JUNK_KEYS.map(lambda k: "INSPECTD_" + k.upper()),
)
ENV_VALUES = st.one_of(
    st.sampled_from(
        [
            "notjson",
            "",
            "{",
            "[]",
            "{}",
            "null",
            "2",
            "0.5",
            "auto",
            "true",
            '[{"id": "b", "url": "synthetic://"}]',
            '{"threshold": 3}',
            '{"port": -1}',
        ]
    ),
    st.text(string.printable, max_size=12),
)
ENVS = st.sampled_from([False, False, True]).flatmap(
    lambda some: st.dictionaries(ENV_NAMES, ENV_VALUES, min_size=1, max_size=2) if some else st.just({})
)
DOCUMENT_TEXT = st.sampled_from([False] * 4 + [True]).flatmap(
    lambda junk: st.binary(max_size=64) if junk else documents().map(render_toml).map(str.encode)
)


# For the second call, with the model: paths that fail without TensorFlow (66, 65, 65).
MODEL_PATHS = {"missing.keras": 66, ".": 65, "c.toml": 65}


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=DOCUMENT_TEXT, env=ENVS, model_path=st.sampled_from(sorted(MODEL_PATHS)))
@example(text=b"\xff\xfe", env={}, model_path=".").via("not UTF-8")
@example(text=CAMERA.encode(), env={"INSPECTD_CAMERAS": "notjson"}, model_path=".").via("issue 7")
@example(text=CAMERA.encode(), env={}, model_path="missing.keras").via("a missing model")
@example(text=b"_cli_parse_args = true\n" + CAMERA.encode(), env={}, model_path=".").via("a BaseSettings option")
@example(text=b'[model]\npath = "a\\u0000b"\n' + CAMERA.encode(), env={}, model_path=".").via("NUL in a path")
@example(text=b"[daemon]\nshutdown_timeout_s = inf\n" + CAMERA.encode(), env={}, model_path=".").via("infinity")
def test_check_config_never_fails_other_than_documented(tmp_path_factory, monkeypatch, capsys, text, env, model_path):
    """Random TOML (real keys, junk keys, any values, or random bytes) and INSPECTD_* variables: exit 0 or 78,
    65/66 for the model file, and on failure exactly one line on stderr; never an internal error."""
    from inspectd.cli import main

    capsys.readouterr()
    tmp = tmp_path_factory.mktemp("prop")
    path = _write(tmp, text)
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.upper().startswith("INSPECTD_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        m.chdir(tmp)
        code = main(["check-config", "--no-model", "--config", str(path)])
        event(f"exit {code}")
        _assert_documented(capsys.readouterr().err, code, (0, 78))
        if code == 0 and not any(n.upper().startswith("INSPECTD_MODEL") for n in env):
            m.setenv("INSPECTD_MODEL__PATH", model_path)  # never the demo model: no TensorFlow per example
            code = main(["check-config", "--config", str(path)])
            _assert_documented(capsys.readouterr().err, code, (MODEL_PATHS[model_path],))


def _assert_documented(err: str, code: int, allowed: tuple[int, ...]) -> None:
    errors = [line for line in err.splitlines() if ": WARNING: " not in line]
    assert code in allowed, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(errors) == (0 if code == 0 else 1), err
    if code:
        assert errors[0].startswith("inspectd check-config: error: "), errors


def test_the_renderer_writes_toml_that_parses():
    """The property test's renderer itself: what it writes parses back to what it was given."""
    import tomllib

    doc = {
        "model": {"threshold": 0.5, "path": 'a"b\n'},
        "cameras": [{"id": "a", "roi": [1, 2]}],
        "junk": True,
        "x": [1, 2],
        "y": [],
        "z": float("inf"),
    }
    assert tomllib.loads(render_toml(doc)) == doc
