"""Configuration: TOML + env overrides, errors that name the key, check-config exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from inspectd.config import load_settings
from inspectd.errors import ConfigError
from inspectd.model.deployable import BUILTIN_DEMO_MODEL

CAMERA = '[[cameras]]\nid = "a"\nurl = "synthetic://"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid():
    s = load_settings(ROOT / "config.example.toml")
    assert [c.id for c in s.cameras] == ["line1-top", "line1-side"]
    assert s.model.path == BUILTIN_DEMO_MODEL and s.batching.max_batch == "auto"


def test_env_overrides_file(tmp_path, monkeypatch):
    path = _write(tmp_path, '[publish]\nendpoint = "tcp://127.0.0.1:1"\n[batching]\nmax_batch = 2\n' + CAMERA)
    monkeypatch.setenv("INSPECTD_PUBLISH__ENDPOINT", "ipc:///tmp/x")
    monkeypatch.setenv("INSPECTD_MODEL__THRESHOLD", "0.7")
    s = load_settings(path)
    assert s.publish.endpoint == "ipc:///tmp/x" and s.model.threshold == 0.7 and s.batching.max_batch == 2


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").touch()  # a file source must exist (check-config refuses a missing one)
    path = _write(tmp_path, '[model]\npath = "models/m.keras"\n[[cameras]]\nid = "a"\nurl = "clips/a.mp4"\n')
    s = load_settings(path)
    assert s.model.path == str(tmp_path / "models/m.keras")
    assert s.cameras[0].url == str(tmp_path / "clips/a.mp4")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[model]\nthreshhold = 0.5\n", "model.threshhold: unknown key; did you mean model.threshold?"),
        ("[model]\nthreshold = 1.5\n", "model.threshold: Input should be less than or equal to 1 (got 1.5)"),
        ('[[cameras]]\nid = "Top Cam"\nurl = "x.mp4"\n', "cameras.0.id"),
        ('[[cameras]]\nid = "a"\n', "set exactly one of url or pipeline"),
        ('[[cameras]]\nid = "a"\nurl = "x"\n[[cameras]]\nid = "a"\nurl = "y"\n', "repeated: a"),
        ("[batching]\nmax_batch = 0\n", "batching.max_batch"),
        ('[publish]\nendpoint = "udp://x"\n', "publish.endpoint"),
        ('[archive]\nframe_format = "gif"\n', "archive.frame_format"),
        ("[archive]\nok_every = -1\n", "archive.ok_every"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        load_settings(_write(tmp_path, text + CAMERA))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_send_hwm_default_bounds_zeromq_and_the_hand_off(start_publisher):
    """Bounded by default: a stuck subscriber holds at most send_hwm messages, and so does the hand-off queue."""
    import zmq

    from inspectd.config import PublishConfig

    assert PublishConfig().send_hwm == 100
    pub = start_publisher()
    assert pub._queue.maxsize == 100 and pub._socket.getsockopt(zmq.SNDHWM) == 100


def test_check_config_cli(tmp_path):
    ok = run_cli("check-config", "--no-model", "--config", ROOT / "config.example.toml")
    assert ok.returncode == 0 and '"line1-top"' in ok.stdout
    bad = run_cli("check-config", "--config", _write(tmp_path, "[model]\ndevice = 'tpu'\n" + CAMERA))
    assert bad.returncode == 78
    assert bad.stderr.strip().count("\n") == 0 and "model.device" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("check-config", "--config", tmp_path / "nope.toml")
    assert missing.returncode == 78 and "no such config file" in missing.stderr
