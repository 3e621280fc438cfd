"""Shared fixtures: small synthetic datasets, one tiny trained model, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
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
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
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


@pytest.fixture(scope="session")
def trained(tf, synth_train, tmp_path_factory):
    """One small model trained from scratch (weights none) with the real `train`; shared by tests."""
    from inspectd.model.train import TrainOptions, train

    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    return train(TrainOptions(dataset=synth_train, out=out, input_size=TRAIN_SIZE, epochs=12, batch_size=16,
                              lr=2e-3, weights="none", seed=0, verbose=0))
