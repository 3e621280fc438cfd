"""Shared fixtures: small synthetic datasets, one tiny trained model, a CLI runner, a publisher, a NOTIFY_SOCKET.

Helpers that are not fixtures (wait_until, free_port, /metrics parsing, event collection) are in support.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import ROOT, TEST_MODEL, NotifySocket, dies_with_tests, wait_until

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Converted models (runtime onnxruntime/openvino) go to one cache per test session, shared by every daemon
# the tests start (they inherit the environment), so a model is converted once per session and never into
# the user's ~/.cache. CACHE_DIRECTORY is what systemd's CacheDirectory= sets for the service.
os.environ["CACHE_DIRECTORY"] = tempfile.mkdtemp(prefix="inspectd-test-cache-")
atexit.register(shutil.rmtree, os.environ["CACHE_DIRECTORY"], ignore_errors=True)

# Tiny on purpose: the whole suite must stay well under 15 minutes on 2 CPU cores.
TRAIN_SIZE = (96, 96)


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, timeout: float = 600, env: dict | None = None) -> Run:
    """Run `python -m inspectd ARGS` as a user would, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "inspectd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def tf():
    from inspectd.tfload import import_tensorflow

    return import_tensorflow()


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory) -> Path:
    from inspectd.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "train"
    write_dataset(out, 240, *TRAIN_SIZE, seed=1)
    return out


@pytest.fixture(scope="session")
def synth_test(tmp_path_factory) -> Path:
    """Held out: another seed, never used for training or model selection."""
    from inspectd.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "test"
    write_dataset(out, 80, *TRAIN_SIZE, seed=99)
    return out


def tiny_recipe(dataset: Path, out: Path, epochs: int = 12, seed: int = 0):
    """The tests' tiny training recipe, not train's defaults (pretrained Lite0, minmax mask rule, docs/quality.md): from
    scratch, the paper's backbone and a fixed probability mask, so the quality floors stay those of that recipe.
    Image labels only (pixel_weight 0), although the synthetic datasets have masks: tests/test_supervision.py
    switches mask supervision on."""
    from inspectd.toolkit.train import TrainOptions

    return TrainOptions(
        dataset=dataset,
        out=out,
        input_size=TRAIN_SIZE,
        epochs=epochs,
        batch_size=16,
        lr=2e-3,
        weights="none",
        seed=seed,
        verbose=0,
        backbone="efficientnetv2b0",
        stride=16,
        mask_rule="probability",
        pixel_weight=0.0,
    )


@pytest.fixture(scope="session")
def trained(tf, synth_train, tmp_path_factory):
    """One small model trained from scratch (weights none) with the real `train`; shared by tests."""
    from inspectd.toolkit.train import train

    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    # Deterministic kernels make it the same model on every run of a machine, so the quality floors test
    # the recipe, not the luck of thread timing. It cannot be switched off again: the tests after this one
    # run with it too, their random ops seeded by train's global seed (unseeded random ops would fail).
    tf.config.experimental.enable_op_determinism()
    return train(tiny_recipe(synth_train, out))


@pytest.fixture()
def start_publisher():
    """start_publisher(**PublishConfig fields) -> a started Publisher (heartbeat 50 ms), stopped at teardown."""
    import uuid

    from prometheus_client import CollectorRegistry

    from inspectd.config import PublishConfig
    from inspectd.metrics import Metrics
    from inspectd.outputs.publish import Publisher

    started: list[Publisher] = []

    def start(endpoint: str = "tcp://127.0.0.1:0", run_id: str | None = None, stats=dict, **cfg) -> Publisher:
        cfg = {"heartbeat_s": 0.05, **cfg}
        pub = Publisher(
            PublishConfig(endpoint=endpoint, **cfg), Metrics(CollectorRegistry()), run_id or uuid.uuid4().hex, TEST_MODEL, stats
        )
        pub.start()
        started.append(pub)
        return pub

    yield start
    for pub in started:
        pub.stop(timeout=0.5)


@pytest.fixture()
def notify_socket(tmp_path):
    """A NotifySocket (what systemd listens on) at tmp_path/notify.sock, closed at teardown."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


# -- a GigE Vision camera: Aravis' own fake one (Debian's aravis-tools) -------------------------------------------

FAKE = "arv-fake-gv-camera-0.8"
SERIAL = "INSPECTD1"
DEVICE = f"Aravis-Fake-{SERIAL}"  # the id Aravis gives the fake camera (arv-tool-0.8 lists it)


@pytest.fixture
def fake_camera():
    """Aravis' fake GigE Vision camera on 127.0.0.1 (real GVCP/GVSP over UDP), found by discovery as DEVICE."""
    assert shutil.which(FAKE), f"{FAKE} is missing: apt-get install aravis-tools (scripts/test.sh does)"
    proc = subprocess.Popen(
        dies_with_tests([FAKE, "-i", "127.0.0.1", "-s", SERIAL]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        from inspectd.sources.genicam import import_aravis

        aravis = import_aravis()

        def listed() -> bool:
            aravis.update_device_list()
            return any(aravis.get_device_id(i) == DEVICE for i in range(aravis.get_n_devices()))

        wait_until(listed, 20, f"the fake camera {DEVICE} to answer discovery")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
