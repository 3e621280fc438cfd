"""The daemon without TensorFlow: an install with the `slim` extra only (ONNX Runtime, OpenVINO; no TensorFlow, no
Keras) runs the exported demo model and publishes the events the TensorFlow path publishes.

scripts/test.sh builds that install (`.venv-slim`, `scripts/bootstrap.sh slim`) and names its interpreter in
TEST_SLIM_PYTHON; CI runs these tests in it. Run by hand without it they are skipped, saying why. Both daemons
are real processes reading the same folder of synthetic frames, compared frame by frame through their `result.`
events (with replay, so nothing published before the subscription is lost)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import ROOT, free_port

from inspectd.client import Subscriber

SLIM = os.environ.get("TEST_SLIM_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SLIM, reason="TEST_SLIM_PYTHON is not set: scripts/test.sh builds the slim install"),
]
FRAMES = 24
SCORE_TOL = 1e-4  # probabilities: float32 graphs in another runtime, and the resize in NumPy (2e-3 grey levels)


@pytest.fixture(scope="module")
def slim_python() -> str:
    assert Path(SLIM).is_file(), f"TEST_SLIM_PYTHON={SLIM}: no such interpreter (scripts/test.sh builds it)"
    return SLIM


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """FRAMES synthetic 320x240 frames, half with a defect, in one folder in a fixed order."""
    data = tmp_path_factory.mktemp("synth")
    done = subprocess.run(
        [str(Path(sys.executable)), "-m", "inspectd", "synth", str(data), "--n", str(FRAMES), "--size", "320x240", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path_factory.mktemp("frames")
    images = sorted(p for sub in ("defect", "ok") for p in (data / sub).iterdir())
    assert len(images) == FRAMES
    for i, image in enumerate(sorted(images, key=lambda p: p.name)):
        shutil.copy(image, folder / f"{i:03d}{image.suffix}")
    return folder


def _results(tmp_path: Path, frames: Path, python: str, **model) -> dict[int, dict]:
    """The `result.` headers of one daemon run of the demo model over `frames`, by frame_seq (1 = the first file);
    `model`: [model] keys beside its path."""
    replay = f"tcp://127.0.0.1:{free_port()}"
    cameras = camera_toml("cam", f"dir://{frames}?fps=20", loop=False)
    config, urls = daemon_config(tmp_path, cameras, publish={"results": True}, replay={"endpoint": replay}, model_keys=model)
    got: dict[int, dict] = {}
    with Subscriber(urls["events"], topics=("result.",), replay=replay) as sub:
        with DaemonProcess(config, tmp_path / "daemon.log", python=python) as daemon:
            daemon.wait_ready(urls["metrics"], timeout=180)
            deadline = time.monotonic() + 120
            while len(got) < FRAMES and time.monotonic() < deadline:
                ev = sub.recv(timeout_s=0.5)
                if ev is not None:
                    got[ev.header["frame_seq"]] = ev.header
            assert len(got) == FRAMES, f"{len(got)} of {FRAMES} results:\n{daemon.log()}"
    return got


@pytest.fixture(scope="module")
def tensorflow_events(tmp_path_factory, frames) -> dict[int, dict]:
    """The reference: the .keras demo model on TensorFlow, in this (full) install."""
    return _results(tmp_path_factory.mktemp("tf"), frames, sys.executable, runtime="tensorflow")


def test_the_slim_install_has_neither_tensorflow_nor_keras(slim_python, tmp_path):
    probe = "import importlib.util as u; print(u.find_spec('tensorflow'), u.find_spec('keras'))"
    out = subprocess.run([slim_python, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "None"], out
    config, _ = daemon_config(tmp_path, camera_toml("cam", "synthetic://"))
    check = subprocess.run(
        [slim_python, "-m", "inspectd", "check-config", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    assert "exported onnx model of demo" in check.stdout, check.stdout


def test_a_keras_model_on_the_slim_install_is_one_line_naming_both_ways_out(slim_python, tmp_path):
    keras_file = ROOT / "inspectd" / "assets" / "demo.keras"
    config, _ = daemon_config(tmp_path, camera_toml("cam", "synthetic://"), model=str(keras_file))
    for command in ("check-config", "run"):
        done = subprocess.run(
            [slim_python, "-m", "inspectd", command, "--config", str(config)], capture_output=True, text=True, timeout=120
        )
        lines = [line for line in done.stderr.splitlines() if " error: " in line]
        assert done.returncode == 69 and len(lines) == 1, done.stderr
        assert "pip install 'inspectd[tensorflow]'" in lines[0] and "--out DIR" in lines[0], lines
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("model", "runtime", "code", "said"),
    [
        ("builtin:demo", "tensorflow", 78, "cannot run"),  # check-config must refuse what `run` would
        ("/nonexistent/model-folder", "auto", 66, "no such model file"),
    ],
)
def test_check_config_on_the_slim_install_refuses_what_run_would(slim_python, tmp_path, model, runtime, code, said):
    config, _ = daemon_config(tmp_path, camera_toml("cam", "synthetic://"), model=model, model_keys={"runtime": runtime})
    for command in ("check-config", "run"):
        done = subprocess.run(
            [slim_python, "-m", "inspectd", command, "--config", str(config)], capture_output=True, text=True, timeout=120
        )
        lines = [line for line in done.stderr.splitlines() if " error: " in line]
        assert done.returncode == code and len(lines) == 1 and said in lines[0], (command, done.returncode, done.stderr)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_slim_daemon_publishes_the_tensorflow_paths_events(slim_python, tmp_path, frames, tensorflow_events, runtime):
    slim = _results(tmp_path, frames, slim_python, runtime=runtime, cache_dir=str(tmp_path / "cache"))
    reference = tensorflow_events
    verdicts = [h["is_defect"] for h in reference.values()]
    assert 0 < sum(verdicts) < FRAMES, "the frames must hold both verdicts for the comparison to mean anything"
    for seq, ref in sorted(reference.items()):
        got = slim[seq]
        assert got["model"]["runtime"] == runtime and ref["model"]["runtime"] == "tensorflow"
        assert got["model"]["sha256"] == ref["model"]["sha256"]  # the exported model names its source
        assert abs(got["score"] - ref["score"]) <= SCORE_TOL, (seq, got["score"], ref["score"])
        assert got["is_defect"] == ref["is_defect"], seq
        assert abs(got["mask_threshold"] - ref["mask_threshold"]) <= SCORE_TOL, seq
        assert [(r["bbox"], r["area_px"]) for r in got["regions"]] == [(r["bbox"], r["area_px"]) for r in ref["regions"]], seq
        for a, b in zip(got["regions"], ref["regions"]):
            assert np.allclose([a["peak"], a["mean"]], [b["peak"], b["mean"]], atol=SCORE_TOL), seq
