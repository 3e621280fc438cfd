"""The daemon's inference engine: one traced function, padded buckets, warm-up, precision switch."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.model.deployable import resolve_model_path


@pytest.fixture(scope="module")
def demo(tf):
    from inspectd.model.deployable import load_model

    return load_model(resolve_model_path("builtin:demo"))


def _frames(n: int, h: int = 240, w: int = 320, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _scene(seed: int, w: int = 320, h: int = 240, defect: bool = True) -> np.ndarray:
    """A synthetic part (varied scores, unlike noise, which saturates the demo model), tinted so that
    a swapped channel order changes the result."""
    from inspectd.synth import render

    grey = render(np.random.default_rng(seed), w, h, defect=defect).image.astype(np.float32)
    return np.clip(grey[..., None] * np.array([1.0, 0.85, 0.7], np.float32), 0, 255).astype(np.uint8)


def _reference(tf, deployable, frame: np.ndarray) -> tuple[float, np.ndarray]:
    """The model called directly on one frame, preprocessed as docs/model.md specifies (independently of
    the engine): RGB 0..255 float, tf.image.resize bilinear with antialiasing to the model input, batch of 1."""
    w, h = deployable.input_size
    x = tf.image.resize(frame[None].astype(np.float32), (h, w), method="bilinear", antialias=True)
    out = deployable.model(x, training=False)
    return float(out["score"].numpy()[0]), out["cam_logits"].numpy()[0]


def _logit(p) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def test_never_retraced_after_warmup(demo):
    from inspectd.pipeline.engine import InferenceEngine

    engine = InferenceEngine(demo, (1, 2, 4))
    engine.warmup((320, 240))
    traced = engine.traces()
    assert traced >= 1
    for n in (1, 3, 2, 4, 1, 4):
        scores, cams = engine.infer(_frames(n))
        assert scores.shape == (n,) and cams.shape == (n, *demo.meta["cam"].values())
    engine.infer(_frames(2, 480, 640) + _frames(1))  # mixed frame sizes from different cameras
    assert engine.traces() == traced


def test_matches_the_model_on_documented_preprocessing(tf, demo):
    """The engine (uint8 in, resize inside its tf.function) gives what the model gives on frames resized
    the documented way, outside the engine."""
    from inspectd.pipeline.engine import InferenceEngine

    frames = [_scene(1), _scene(2, defect=False)]
    scores, cams = InferenceEngine(demo, (2,)).infer(frames)
    ref = [_reference(tf, demo, f) for f in frames]
    assert np.ptp([r[0] for r in ref]) > 0.3, "the probe must exercise varied scores"
    np.testing.assert_allclose(scores, [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cams, [r[1] for r in ref], atol=1e-3)
    assert cams.shape == (2, *ref[0][1].shape) == (2, demo.meta["cam"]["height"], demo.meta["cam"]["width"])


def test_padding_does_not_change_results(tf, demo):
    """3 frames zero-padded into bucket 4 give each frame's own, unpadded single-frame result."""
    from inspectd.pipeline.engine import InferenceEngine

    engine = InferenceEngine(demo, (1, 4))
    assert engine.bucket(3) == 4 and engine.bucket(1) == 1
    frames = [_scene(3), _scene(4, defect=False), _scene(5)]
    scores, cams = engine.infer(frames)
    ref = [_reference(tf, demo, f) for f in frames]
    np.testing.assert_allclose(scores, [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cams, [r[1] for r in ref], atol=1e-3)


def test_mixed_frame_sizes_match_the_model(tf, demo):
    """Frames of two cameras with different sizes in one batch: each as the model sees it alone.

    (They are first resized to the model input and rounded to uint8 to share one batch: a small difference.)"""
    from inspectd.pipeline.engine import InferenceEngine

    frames = [_scene(6), _scene(7, 640, 480, defect=False), _scene(8, 160, 128)]
    scores, cams = InferenceEngine(demo, (4,)).infer(frames)
    ref = [_reference(tf, demo, f) for f in frames]
    np.testing.assert_allclose(scores, [r[0] for r in ref], atol=0.01)
    for cam, (_, expected) in zip(cams, ref):
        # uint8 rounding moves the logits of a confident map (they span about 50 with the demo model) by up to
        # about 2: every cell within 5 % of the map's range (0.5 at least)
        np.testing.assert_allclose(cam, expected, atol=max(0.5, 0.05 * float(np.ptp(expected))))


def test_score_is_the_sigmoid_of_the_mean_cam(demo):
    """The CAM identity on the engine's outputs: the deployable's head pools the CAM with
    GlobalAveragePooling2D, so mean(cam_logits) == logit(score) for each frame, padding or not."""
    from inspectd.pipeline.engine import InferenceEngine

    # The identity is GAP's; models recorded with another pooling (inspectd.model.head) pool otherwise.
    assert (demo.meta.get("pooling") or {}).get("kind", "gap") == "gap", demo.meta.get("pooling")
    frames = [_scene(9), _scene(10, defect=False), _scene(11)]
    scores, cams = InferenceEngine(demo, (4,)).infer(frames)
    assert np.ptp(scores) > 0.3, scores
    # Compared as probabilities: the logit of a float32 score near 1 is ill-conditioned (at score 0.99999 one
    # float32 step is 0.007 in logit), the sigmoid of the mean logit is not.
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-cams.mean(axis=(1, 2)))), scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cams.mean(axis=(1, 2))[scores < 0.999], _logit(scores)[scores < 0.999], atol=1e-3)


def test_mixed_precision_switch(demo, tmp_path):
    """TensorFlow at bfloat16 (Keras' mixed_bfloat16 policy; float16 is the same switch, on GPUs). Not gated here
    (gated=False is what the quality gate itself runs); the daemon's path refuses it until the gate passed."""
    from inspectd.errors import ConfigError
    from inspectd.pipeline.engine import InferenceEngine

    frames = [_scene(12), _scene(13, defect=False)]
    ref = InferenceEngine(demo, (2,)).infer(frames)
    with pytest.raises(ConfigError, match="has not been checked against float32 with tensorflow"):
        InferenceEngine(demo, (2,), precision="bfloat16", cache_dir=tmp_path)
    mixed = InferenceEngine(demo, (2,), precision="bfloat16", gated=False).infer(frames)
    assert mixed[0].dtype == np.float32 and mixed[1].dtype == np.float32
    # It really computes in bfloat16 (not the float32 model again: its rounding shows in the logits)...
    assert np.abs(mixed[1] - ref[1]).max() > 1e-3
    # ...and still gives the same answers.
    np.testing.assert_allclose(mixed[0], ref[0], atol=0.05)
    assert np.corrcoef(mixed[1].ravel(), ref[1].ravel())[0, 1] > 0.99


def test_xla_compiles_the_model_and_resizes_camera_frames(demo):
    """model.xla = true with frames of another size than the model's input: XLA compiles the model (the
    antialiased resize has no XLA kernel, so it stays outside), and the outputs are the graph's."""
    from inspectd.pipeline.engine import InferenceEngine

    frames = [_scene(14), _scene(15, defect=False)]
    ref = InferenceEngine(demo, (2,)).infer(frames)
    xla = InferenceEngine(demo, (2,), xla=True)
    xla.warmup((320, 240))
    out = xla.infer(frames)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-4)
    np.testing.assert_allclose(out[1], ref[1], atol=1e-3)


def test_bad_device(demo):
    from inspectd.errors import ConfigError
    from inspectd.pipeline.engine import InferenceEngine

    with pytest.raises(ConfigError, match="gpu:3"):
        InferenceEngine(demo, (1,), device="gpu:3")
