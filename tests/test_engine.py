"""The daemon's inference engine: one traced function, padded buckets, warm-up, precision switch."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.service.config import resolve_model_path


@pytest.fixture(scope="module")
def demo(tf):
    from inspectd.model.deployable import load_model

    return load_model(resolve_model_path("builtin:demo"))


def _frames(n: int, h: int = 240, w: int = 320, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_never_retraced_after_warmup(demo):
    from inspectd.pipeline.engine import InferenceEngine

    engine = InferenceEngine(demo, (1, 2, 4))
    engine.warmup((320, 240))
    traced = engine.traces()
    assert traced >= 1
    for n in (1, 3, 2, 4, 1, 4):
        scores, cams = engine.infer(_frames(n))
        assert scores.shape == (n,) and cams.shape == (n, 8, 10)
    engine.infer(_frames(2, 480, 640) + _frames(1))  # mixed frame sizes from different cameras
    assert engine.traces() == traced


def test_padding_does_not_change_results(demo):
    """A frame's score is the same alone (bucket 1) and padded into bucket 4."""
    from inspectd.pipeline.engine import InferenceEngine

    engine = InferenceEngine(demo, (1, 4))
    frames = _frames(3, seed=1)
    alone = [engine.infer([f])[0][0] for f in frames]
    together = engine.infer(frames)[0]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert engine.bucket(3) == 4 and engine.bucket(1) == 1


def test_matches_offline_predictor(demo):
    """The daemon path (resize inside the tf.function) equals the offline toolkit's Predictor."""
    from inspectd.pipeline.engine import InferenceEngine, Predictor

    frames = _frames(2, seed=2)
    scores, cams = InferenceEngine(demo, (2,)).infer(frames)
    preds = Predictor(demo, batch_size=2).predict(frames)
    np.testing.assert_allclose(scores, [p.score for p in preds], atol=1e-4)
    np.testing.assert_allclose(cams, [p.cam_logits for p in preds], atol=1e-3)


def test_mixed_precision_switch(demo):
    from inspectd.pipeline.engine import InferenceEngine

    frames = _frames(2, seed=3)
    ref = InferenceEngine(demo, (2,)).infer(frames)
    mixed = InferenceEngine(demo, (2,), precision="mixed_float16").infer(frames)
    assert mixed[0].dtype == np.float32
    np.testing.assert_allclose(mixed[0], ref[0], atol=0.05)
    assert np.corrcoef(mixed[1].ravel(), ref[1].ravel())[0, 1] > 0.99


def test_bad_device(demo):
    from inspectd.errors import ConfigError
    from inspectd.pipeline.engine import InferenceEngine

    with pytest.raises(ConfigError, match="gpu:3"):
        InferenceEngine(demo, (1,), device="gpu:3")
