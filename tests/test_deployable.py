"""The two-output model: the CAM identity, save/load round trip, safe-mode loading, metadata."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from inspectd.errors import ModelFileError, NoInputError, UsageError
from inspectd.model.deployable import build_deployable, find_head, load_model, read_metadata, save_model

SIZE = (96, 64)  # width, height: not square, so a transposed axis would show


@pytest.fixture(scope="module")
def classifier(tf):
    """A random, untrained GAP+Dense classifier with a head strong enough to give varied scores."""
    import keras

    from inspectd.toolkit.backbones import build_features

    keras.utils.set_random_seed(3)
    features = build_features("efficientnetv2b0", 16, SIZE, "none")
    image = keras.Input((SIZE[1], SIZE[0], 3))
    x = keras.layers.GlobalAveragePooling2D()(features(image))
    x = keras.layers.Dropout(0.3)(x)
    score = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(image, score)
    dense = model.layers[-1]
    rng = np.random.default_rng(0)
    dense.set_weights([rng.normal(0, 3, dense.kernel.shape).astype("float32"), np.array([0.7], "float32")])
    return model


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(1).uniform(0, 255, (4, SIZE[1], SIZE[0], 3)).astype("float32")


def test_cam_identity(classifier, batch):
    """mean(cam_logits) is exactly the classifier's logit; score equals the classifier's output."""
    import keras

    deploy = build_deployable(classifier)
    out = deploy(batch)
    cam = out["cam_logits"].numpy()
    assert cam.shape == (4, SIZE[1] // 16, SIZE[0] // 16)
    head = find_head(classifier)
    pooled = keras.Model(classifier.input, classifier.layers[-3].output)(batch).numpy()  # one input, as it is called
    logit = pooled @ head.weight + head.bias
    assert np.std(logit) > 0.05, "the probe must exercise varied logits"
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), logit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["score"].numpy(), classifier(batch).numpy()[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["score"].numpy(), 1 / (1 + np.exp(-cam.mean(axis=(1, 2)))), rtol=1e-5, atol=1e-6)


def test_softmax_two_class_head_is_exact(tf, batch):
    import keras

    x = keras.Input((SIZE[1], SIZE[0], 3))
    f = keras.layers.Conv2D(8, 3, strides=16, padding="same")(x)
    p = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(f))
    clf = keras.Model(x, p)
    out = build_deployable(clf)(batch)
    np.testing.assert_allclose(out["score"].numpy(), clf(batch).numpy()[:, 1], rtol=1e-5, atol=1e-6)


def test_sequential_classifier(tf, batch):
    import keras

    from inspectd.toolkit.backbones import build_features

    seq = keras.Sequential(
        [
            keras.Input((SIZE[1], SIZE[0], 3)),
            build_features("mobilenetv3large", 32, SIZE, "none"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    out = build_deployable(seq)(batch)
    np.testing.assert_allclose(out["score"].numpy(), seq(batch).numpy()[:, 0], rtol=1e-5, atol=1e-6)
    assert out["cam_logits"].shape == (4, 2, 3)


def test_head_without_gap_is_refused(tf):
    import keras

    x = keras.Input((32, 32, 3))
    y = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(x)))
    with pytest.raises(ModelFileError, match="GlobalAveragePooling2D"):
        find_head(keras.Model(x, y))


def test_save_load_round_trip(classifier, batch, tmp_path):
    deploy = build_deployable(classifier)
    path = save_model(deploy, tmp_path / "m.keras", {"name": "m", "backbone": "efficientnetv2b0"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"], "no temporary file may be left behind"
    loaded = load_model(path)
    before, after = deploy(batch), loaded.model(batch)
    np.testing.assert_array_equal(before["score"].numpy(), after["score"].numpy())
    np.testing.assert_array_equal(before["cam_logits"].numpy(), after["cam_logits"].numpy())
    assert loaded.meta["input"]["width"] == SIZE[0] and loaded.meta["cam"] == {"height": 4, "width": 6}
    assert loaded.meta["stride"] == 16 and loaded.input_size == SIZE
    assert loaded.threshold == 0.5 and loaded.mask_threshold == 0.5
    assert len(loaded.sha256) == 64 and load_model(path).sha256 == loaded.sha256


def test_save_requires_keras_suffix(classifier, tmp_path):
    with pytest.raises(UsageError, match=r"\.keras"):
        save_model(build_deployable(classifier), tmp_path / "m.h5", {})


def test_safe_mode_refuses_code(tf, tmp_path):
    """A model file carrying a Lambda (Python bytecode) must not load, even with our metadata."""
    import keras

    x = keras.Input((32, 32, 3))
    y = keras.layers.Lambda(lambda t: t * 2.0)(x)
    path = tmp_path / "evil.keras"
    keras.Model(x, y).save(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(
            "inspectd.json",
            json.dumps(
                {"format": "inspectd.model/1", "input": {"width": 32, "height": 32}, "thresholds": {"score": 0.5, "mask": 0.5}}
            ),
        )
    with pytest.raises(ModelFileError, match="cannot load the model safely"):
        load_model(path)


def test_files_that_are_not_ours(tf, tmp_path):
    import keras

    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="not an inspectd model"):
        read_metadata(junk)
    plain = tmp_path / "plain.keras"
    x = keras.Input((8,))
    keras.Model(x, keras.layers.Dense(1)(x)).save(plain)
    with pytest.raises(ModelFileError, match="inspectd convert"):
        load_model(plain)
    with pytest.raises(NoInputError):
        load_model(tmp_path / "missing.keras")
    future = tmp_path / "future.keras"
    with zipfile.ZipFile(future, "w") as z:
        z.writestr("inspectd.json", json.dumps({"format": "inspectd.model/9"}))
    with pytest.raises(ModelFileError, match="inspectd.model/9"):
        read_metadata(future)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("thresholds"), "'thresholds' missing"),
        (lambda m: m["input"].update(width="wide"), "input size wide"),
        (lambda m: m["thresholds"].update(mask=1.5), r"thresholds.mask 1.5 is not a number in \[0, 1\]"),
        (lambda m: m["input"].update(width=True), "input size True"),
        (lambda m: m.update(pooling="gap"), "pooling is str, not an object"),
        (lambda m: m.update(input="96x96"), "input is str, not an object"),
        (lambda m: m.update(mask_rule=["minmax", 0.5]), "mask_rule is list, not an object"),
        (lambda m: m.update(pooling={"kind": "median", "param": None}), "pooling 'median'"),
        (lambda m: m.update(pooling={"kind": "topk", "param": 3}), "pooling 'topk:3.0'"),
        (lambda m: m.update(mask_rule={"kind": "minmax", "param": 7}), "minmax: parameter 7.0 outside"),
        (lambda m: m.update(mask_rule={"kind": "otsu", "param": 0.5}), "mask rule 'otsu'"),
    ],
)
def test_bad_metadata_is_one_clear_error(classifier, tmp_path, edit, message):
    """Metadata is read before TensorFlow: a wrong field is a ModelFileError (exit 65) naming it."""
    path = tmp_path / "m.keras"
    save_model(build_deployable(classifier), path, {})
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(entries["inspectd.json"])
    edit(meta)
    entries["inspectd.json"] = json.dumps(meta).encode()
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(ModelFileError, match=message):
        read_metadata(bad)
    read_metadata(path)  # the unedited file is fine


# ---- exported model folders (inspectd export --out; the bundled demo-onnx) --------------------------------------


def _demo_export(tmp_path):
    import shutil

    from inspectd.model.deployable import _ASSETS

    folder = tmp_path / "demo-onnx"
    shutil.copytree(_ASSETS / "demo-onnx", folder)
    return folder


def test_the_bundled_export_is_the_bundled_model():
    """builtin:demo without Keras is inspectd/assets/demo-onnx: the same model as demo.keras (scripts/make_demo_model.sh
    makes both); a demo.keras retrained without exporting again fails here."""
    from inspectd.model.deployable import _ASSETS, file_sha256, load_exported

    exported = load_exported(_ASSETS / "demo-onnx")
    assert exported.sha256 == file_sha256(_ASSETS / "demo.keras")
    assert exported.meta == read_metadata(_ASSETS / "demo.keras")
    assert exported.model is None and exported.graph_format == "onnx" and exported.graph.name == "model.onnx"


def test_an_exported_folder_loads_without_keras_and_is_checked(tmp_path):
    from inspectd.model.deployable import EXPORT_MANIFEST, model_sha256

    folder = _demo_export(tmp_path)
    model = load_model(folder)
    assert model.name == "demo" and model.input_size == (160, 128) and model_sha256(folder) == model.sha256
    assert read_metadata(folder) == model.meta
    graph = folder / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF  # a damaged or replaced graph
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_model(folder)
    graph.unlink()
    with pytest.raises(ModelFileError, match="model.onnx named by .* is missing"):
        load_model(folder)
    manifest = folder / EXPORT_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "artifact": "something else"}))
    with pytest.raises(ModelFileError, match="not an exported inspectd model"):
        load_model(folder)
    manifest.write_text("{")
    with pytest.raises(ModelFileError, match="damaged"):
        load_model(folder)
    manifest.unlink()
    with pytest.raises(ModelFileError, match="is a folder, not a model file"):
        read_metadata(folder)


def test_an_exported_folder_with_bad_metadata_is_one_error(tmp_path):
    from inspectd.model.deployable import EXPORT_MANIFEST

    folder = _demo_export(tmp_path)
    manifest = folder / EXPORT_MANIFEST
    data = json.loads(manifest.read_text())
    data["meta"]["thresholds"]["score"] = 2
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"thresholds.score 2 is not a number in \[0, 1\]"):
        load_model(folder)


def test_tensorflow_does_not_run_an_exported_model(tmp_path):
    from inspectd.errors import ConfigError
    from inspectd.pipeline.engine import InferenceEngine

    with pytest.raises(ConfigError, match="exported onnx graph, which onnxruntime or openvino runs"):
        InferenceEngine(load_model(_demo_export(tmp_path)), (1,), "cpu", runtime="tensorflow")


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("sha256", None, "sha256 None is not a SHA-256"),
        ("sha256", "abc", "sha256 'abc' is not a SHA-256"),
        ("converter", 3, "converter 3"),
        ("format", "tflite", "format 'tflite'"),
    ],
)
def test_an_incomplete_manifest_is_one_error(tmp_path, key, value, error):
    from inspectd.model.deployable import EXPORT_MANIFEST

    folder = _demo_export(tmp_path)
    manifest = folder / EXPORT_MANIFEST
    data = json.loads(manifest.read_text())
    data.pop(key) if value is None else data.update({key: value})
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=error):
        load_model(folder)
    data = json.loads((_demo_export(tmp_path / "again") / EXPORT_MANIFEST).read_text())
    del data["meta"]["cam"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="cam None is not a positive height and width"):
        load_model(folder)


def test_a_new_export_into_the_folder_is_a_new_revision_of_the_same_model(tmp_path):
    """Reload's change detection (revision) sees a re-export of the same .keras file; the identity (sha256) stays."""
    from inspectd.model.deployable import EXPORT_MANIFEST, model_revision, model_sha256

    folder = _demo_export(tmp_path)
    before = load_model(folder)
    assert model_revision(folder) == before.revision != before.sha256
    manifest = folder / EXPORT_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "converter": "tf2onnx9.9-onnx9.9-opset99"}))
    assert model_revision(folder) != before.revision and model_sha256(folder) == before.sha256
    assert load_model(folder).revision == model_revision(folder)


def test_an_exported_model_on_a_full_install_never_imports_tensorflow(tmp_path):
    """TensorFlow is installed here; the daemon's path for an exported model (load, device, resize, ONNX Runtime and
    OpenVINO) must still not import it (start-up seconds and memory on a full install)."""
    import subprocess
    import sys

    folder = _demo_export(tmp_path)
    probe = f"""
import sys, numpy as np
from inspectd.model.deployable import load_model
from inspectd.pipeline.engine import InferenceEngine
model = load_model({str(folder)!r})
for runtime in ("onnxruntime", "openvino", "auto"):
    engine = InferenceEngine(model, (2,), "auto", runtime=runtime, cache_dir={str(tmp_path / "cache")!r})
    scores, cams = engine.infer([np.zeros((240, 320, 3), np.uint8), np.zeros((100, 90, 3), np.uint8)])
    assert scores.shape == (2,) and engine.device == "/CPU:0", (scores.shape, engine.device)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


@pytest.mark.slow
def test_export_out_replaces_an_earlier_export_and_refuses_a_foreign_folder(tmp_path):
    """`inspectd export --out DIR`: written beside and renamed in; a second export replaces the first with nothing
    left behind; a folder holding anything else is never written into."""
    from inspectd.model.deployable import EXPORT_MANIFEST, resolve_model_path
    from inspectd.model.export import export_folder

    keras_model = load_model(resolve_model_path("builtin:demo"))
    out = tmp_path / "models" / "demo"
    graph = export_folder(keras_model, "openvino", out)
    assert graph == out / "model.xml" and load_model(out).sha256 == keras_model.sha256
    (out / "left-from-before").write_text("x")  # an earlier export's folder is replaced whole, not written into
    export_folder(keras_model, "openvino", out)
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_MANIFEST, "model.bin", "model.xml"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no temporary or old folder beside it
    foreign = tmp_path / "models" / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not an exported model"):
        export_folder(keras_model, "openvino", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
