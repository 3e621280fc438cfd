"""An optional dependency that is not installed: one line naming the extra to install, exit 69, for each
extra (bridges, onnx, openvino, gstreamer, toolkit), never a traceback. The packages are installed here,
so their absence is made in-process: `sys.modules[name] = None` makes Python's import raise
ModuleNotFoundError exactly as a missing package does, and find_spec (what check-config uses, to import
nothing) is told the same."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

CAMERA = '[[cameras]]\nid = "a"\nurl = "synthetic://?fps=5"\n'


def _run(tmp_path, monkeypatch, capsys, missing: str, argv: list[str], config: str, name: str = "c.toml"):
    from inspectd.cli import main

    path = tmp_path / name
    path.write_text(config)
    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:
        for var in [n for n in os.environ if n.upper().startswith("INSPECTD_")]:
            m.delenv(var)
        m.setitem(sys.modules, missing, None)
        for sub in [k for k in sys.modules if k.startswith(missing + ".")]:
            m.setitem(sys.modules, sub, None)
        m.setattr(importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] == missing else real_find_spec(n, *a))
        m.chdir(tmp_path)
        capsys.readouterr()
        code = main([*argv, "--config", str(path)])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("missing", "extra", "argv", "config"),
    [
        ("onnxruntime", "onnx", ["check-config", "--no-model"], '[model]\nruntime = "onnxruntime"\n' + CAMERA),
        ("openvino", "openvino", ["check-config", "--no-model"], '[model]\nruntime = "openvino"\n' + CAMERA),
        ("gi", "gstreamer", ["check-config", "--no-model"], '[[cameras]]\nid = "a"\npipeline = "videotestsrc ! appsink"\n'),
        ("onnxruntime", "onnx", ["run"], '[model]\nruntime = "onnxruntime"\n' + CAMERA),
        ("asyncua", "bridges", ["bridge", "opcua"], '[[daemons]]\nendpoint = "tcp://127.0.0.1:5556"\nline = "l"\n'),
        ("paho", "bridges", ["bridge", "mqtt"], '[[daemons]]\nendpoint = "tcp://127.0.0.1:5556"\nline = "l"\n'),
    ],
    ids=["onnx", "openvino", "gstreamer", "run-onnx", "bridge-opcua", "bridge-mqtt"],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys, missing, extra, argv, config):
    code, err = _run(tmp_path, monkeypatch, capsys, missing, argv, config)
    assert code == 69 and len(err) == 1, err
    assert f"needs the {extra} extra ({missing} is missing): pip install 'inspectd[{extra}]'" in err[0], err


def test_the_toolkit_extra_is_named_too(tmp_path, monkeypatch, capsys):
    from inspectd.errors import missing_extra

    for module in ("sklearn", "matplotlib.pyplot"):
        error = missing_extra(ModuleNotFoundError(name=module))
        assert error is not None and error.exit_code == 69 and "pip install 'inspectd[toolkit]'" in str(error)
    assert missing_extra(ModuleNotFoundError(name="numpy")) is None  # a required package missing is a bug
