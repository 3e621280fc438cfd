"""The CAM head's poolings: each exact (pool(cam_logits) = logit(score)), saved and loaded in safe mode."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.model.head import Pooling, parse_pooling, pool_numpy

SIZE = (96, 64)  # (width, height); a 6 x 4 CAM at stride 16
POOLINGS = ["gap", "max", "lse:0.5", "lse:5", "lse:40", "topk:0.1", "topk:0.5", "topk:1"]


def test_parse_pooling():
    assert parse_pooling("gap") == Pooling("gap")
    assert parse_pooling("LSE:2.5") == Pooling("lse", 2.5)
    assert parse_pooling("topk") == Pooling("topk", 0.1)
    for bad in ("avg", "lse:0", "lse:-1", "topk:1.5", "gap:3", "lse:nan", "lse:x"):
        with pytest.raises(ValueError):
            parse_pooling(bad)
    assert Pooling.from_meta(None) == Pooling("gap")  # models from before poolings existed


def test_pool_numpy_against_definitions():
    """The reference poolings, against their textbook definitions on a small map."""
    x = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 10.0]])
    assert pool_numpy(x, Pooling("gap")) == pytest.approx(20 / 6)
    assert pool_numpy(x, Pooling("max")) == 10.0
    assert pool_numpy(x, Pooling("topk", 0.34)) == pytest.approx((10 + 4) / 2)  # round(0.34 * 6) = 2 cells
    r = 0.7
    assert pool_numpy(x, Pooling("lse", r)) == pytest.approx(np.log(np.mean(np.exp(r * x))) / r)
    big = np.full((4, 4), 500.0)  # exp(40 * 500) overflows: the stable form still gives 500
    assert pool_numpy(big, Pooling("lse", 40)) == pytest.approx(500.0)


def _model(pooling: str):
    import keras

    from inspectd.model.head import cam_head, deployable_outputs

    keras.utils.set_random_seed(0)  # the probe's weights, hence its logits, are the same on every run
    image = keras.Input((SIZE[1], SIZE[0], 3))
    fmap = keras.layers.Conv2D(8, 16, strides=16, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(image))
    cam, score = cam_head(fmap, parse_pooling(pooling))
    return keras.Model(image, deployable_outputs(cam, score))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_is_exact_and_survives_save_and_safe_load(tf, tmp_path, pooling):
    """score = sigmoid(pool(cam_logits)) to 1e-5, before and after a save/load in safe mode."""
    from inspectd.model.deployable import load_model, save_model

    model = _model(pooling)
    model.get_layer("cam").set_weights(
        [np.random.default_rng(0).normal(0, 8, (1, 1, 8, 1)).astype("float32"), np.array([-1.0], "float32")]
    )
    batch = np.random.default_rng(1).uniform(0, 255, (4, SIZE[1], SIZE[0], 3)).astype("float32")
    path = save_model(model, tmp_path / "m.keras", {"name": "m", "pooling": parse_pooling(pooling).as_meta()})
    loaded = load_model(path)
    assert loaded.pooling == parse_pooling(pooling)
    for m in (model, loaded.model):
        out = m(batch)
        cams, scores = out["cam_logits"].numpy(), out["score"].numpy().astype(np.float64)
        assert cams.shape == (4, SIZE[1] // 16, SIZE[0] // 16)
        logits = np.log(scores / (1 - scores))
        expected = [pool_numpy(c, loaded.pooling) for c in cams]
        assert np.std(expected) > 0.05, "the probe must exercise varied logits"
        np.testing.assert_allclose(logits, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max())), rtol=1e-5)


def test_poolings_differ():
    """The identity test would pass for any pooling that equals another; these are really different."""
    x = np.random.default_rng(3).normal(0, 1, (4, 6))
    values = {p: pool_numpy(x, parse_pooling(p)) for p in POOLINGS if p != "topk:1"}
    assert len({round(v, 6) for v in values.values()}) == len(values)
    assert pool_numpy(x, parse_pooling("topk:1")) == pytest.approx(values["gap"])


def _whitening_model(storage: str | None, kernel: np.ndarray, bias: np.ndarray):
    import keras

    from inspectd.model.head import location_whiten

    x = keras.Input(kernel.shape[:2] + kernel.shape[3:])
    layer = location_whiten()(name="whiten", **({} if storage is None else {"storage": storage}))
    model = keras.Model(x, layer(x))
    layer.set_weights([kernel, bias])
    return model


def test_whitening_matrices_in_float16_give_float32s_result_in_half_the_file(tf, tmp_path):
    """LocationWhiten's storage: float16 matrices (the ok-only model's, most of its file) are stored as such, load
    in safe mode, and give the float32 layer's output to 1e-3 of its range with matrices like an ok-only model's
    (entries up to about 1.5, most near 1e-3); a layer saved without the option is float32, as the first files."""
    import keras

    from inspectd.model.deployable import load_model, save_model

    rng = np.random.default_rng(0)
    kernel = (rng.normal(0, 1e-3, (4, 3, 16, 16)) + np.eye(16) * rng.uniform(0.2, 1.5, (4, 3, 1, 1))).astype(np.float32)
    bias = rng.normal(0, 3, (4, 3, 16)).astype(np.float32)
    x = rng.normal(0, 2, (5, 4, 3, 16)).astype(np.float32)
    reference = _whitening_model(None, kernel, bias)
    half = _whitening_model("float16", kernel.astype(np.float16), bias)
    assert reference.get_layer("whiten").kernel.dtype == "float32" and half.get_layer("whiten").kernel.dtype == "float16"
    expected = np.einsum("bhwd,hwcd->bhwc", x.astype(np.float64), kernel.astype(np.float64)) + bias
    np.testing.assert_allclose(reference(x).numpy(), expected, atol=1e-4)
    sizes = {}
    for name, model in (("float32", reference), ("float16", half)):
        total = keras.layers.Conv2D(1, 1, kernel_initializer="ones", use_bias=False)(model.output)  # the channels' sum
        score = keras.layers.Reshape((), name="score")(keras.layers.GlobalAveragePooling2D()(total))
        full = keras.Model(model.input, {"score": score, "cam_logits": keras.layers.Reshape((4, 3), name="cam_logits")(total)})
        path = save_model(full, tmp_path / f"{name}.keras", {"name": name})
        sizes[name] = path.stat().st_size
        got = load_model(path).model(x)["cam_logits"].numpy()
        want = expected.sum(-1)
        assert np.abs(got - want).max() <= 1e-3 * np.ptp(want), (name, np.abs(got - want).max(), np.ptp(want))
    assert sizes["float16"] < sizes["float32"]
    with pytest.raises(ValueError, match="storage 'int8': float32 or float16"):
        _whitening_model("int8", kernel, bias)
