"""`convert`: classifiers saved the reference's way (Keras 2, .hdf5 / SavedModel) -> deployable model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from inspectd.errors import ModelFileError
from inspectd.model.deployable import load_model
from inspectd.toolkit.convert import convert, load_classifier


@pytest.fixture(scope="session")
def keras2(tmp_path_factory) -> Path:
    """Made by tests/fixtures/make_keras2_classifier.py with tf-keras (the Keras 2 API)."""
    pytest.importorskip("tf_keras")
    out = tmp_path_factory.mktemp("keras2")
    subprocess.run(
        [sys.executable, str(ROOT / "tests/fixtures/make_keras2_classifier.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def _check_same_as_keras2(model_path: Path, keras2: Path) -> None:
    deploy = load_model(model_path)
    out = deploy.model(np.load(keras2 / "probe.npy"))
    np.testing.assert_allclose(out["score"].numpy(), np.load(keras2 / "expected.npy"), atol=1e-5)
    np.testing.assert_allclose(out["cam_logits"].numpy().mean(axis=(1, 2)), np.load(keras2 / "expected_logit.npy"), atol=1e-4)


def test_reference_hdf5(tf, keras2, tmp_path):
    path = convert(keras2 / "reference.hdf5", tmp_path / "ref.keras")
    _check_same_as_keras2(path, keras2)
    meta = load_model(path).meta
    assert meta["backbone"] == "efficientnetv2b0"
    assert meta["stride"] == 16 and meta["cam"] == {"height": 4, "width": 6}
    assert meta["source"]["kind"] == "convert"


def test_keras2_savedmodel(tf, keras2, tmp_path):
    path = convert(keras2 / "savedmodel", tmp_path / "sm.keras")
    _check_same_as_keras2(path, keras2)


def test_lambda_refused(tf, keras2):
    with pytest.raises(ModelFileError, match="Lambda"):
        load_classifier(keras2 / "lambda.hdf5")


def test_cli_convert_and_thresholds(keras2, tmp_path):
    r = run_cli(
        "convert", keras2 / "reference.hdf5", "--out", tmp_path / "c.keras", "--threshold", "0.7", "--mask-threshold", "0.6"
    )
    assert r.returncode == 0, r.stderr
    meta = load_model(tmp_path / "c.keras").meta
    assert meta["thresholds"] == {"score": 0.7, "mask": 0.6}


def test_cli_convert_lambda_one_line_error(keras2, tmp_path):
    r = run_cli("convert", keras2 / "lambda.hdf5", "--out", tmp_path / "x.keras")
    assert r.returncode == 65
    assert len(r.stderr.strip().splitlines()) == 1 and "Lambda" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.keras").exists()


def test_input_range_rescales(tf, tmp_path):
    """A classifier trained on 0..1 input gets a Rescaling in front: the deployable still takes 0..255."""
    import keras

    x = keras.Input((32, 32, 3))
    f = keras.layers.Conv2D(4, 3, strides=16, padding="same")(x)
    clf = keras.Model(x, keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(f)))
    clf.save(tmp_path / "unit.keras")
    path = convert(tmp_path / "unit.keras", tmp_path / "d.keras", input_range="0-1")
    probe = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    got = load_model(path).model(probe)["score"].numpy()
    np.testing.assert_allclose(got, clf(probe / 255.0).numpy()[:, 0], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_converted_seed_classifier_on_every_runtime(tf, keras2, tmp_path_factory, runtime):
    """The reference's network (EfficientNetV2B0 cut at stride 16), converted, runs with TensorFlow's outputs
    on ONNX Runtime and OpenVINO (tolerance as in test_runtimes.py and docs/performance.md)."""
    from inspectd.pipeline.engine import InferenceEngine

    path = tmp_path_factory.getbasetemp() / "seed-runtimes.keras"
    if not path.is_file():
        convert(keras2 / "reference.hdf5", path)
    deploy = load_model(path)
    w, h = deploy.input_size
    probe = np.load(keras2 / "probe.npy").round().clip(0, 255).astype(np.uint8)
    noise = np.random.default_rng(5).integers(0, 256, (2, 2 * h + 3, 2 * w + 5, 3), dtype=np.uint8)
    ref = InferenceEngine(deploy, (4,), "cpu", runtime="tensorflow")
    engine = InferenceEngine(deploy, (4,), "cpu", runtime=runtime)
    for frames in (list(probe[:4]), list(noise)):
        (s0, c0), (s1, c1) = ref.infer(frames), engine.infer(frames)
        assert c1.shape == c0.shape == (len(frames), 4, 6)
        assert np.abs(s1 - s0).max() <= 1e-4 and np.abs(c1 - c0).max() <= 1e-3
        np.testing.assert_allclose(np.log(s1 / (1 - s1)), c1.mean(axis=(1, 2)), atol=1e-4)
