"""Probability maps -> regions and mask encodings (the code the daemon will share)."""

from __future__ import annotations

import cv2
import numpy as np

from inspectd.drawing import MAP_MODES
from inspectd.pipeline.postprocess import find_regions, overlay, probability, to_mask_u8, upsample


def test_probability_is_sigmoid_and_stable():
    logits = np.array([[-1000.0, 0.0, 1000.0]], np.float32)
    np.testing.assert_allclose(probability(logits), [[0.0, 0.5, 1.0]], atol=1e-6)


def test_regions_found_with_stats():
    prob = np.zeros((40, 60), np.float32)
    prob[5:10, 10:20] = 0.9  # 50 px
    prob[30:32, 40:41] = 0.6  # 2 px
    prob[7, 15] = 0.99
    regions = find_regions(prob, 0.5)
    assert [r.bbox for r in regions] == [(10, 5, 10, 5), (40, 30, 1, 2)]
    assert regions[0].area_px == 50 and regions[0].peak == np.float32(0.99)
    assert 0.9 < regions[0].mean < 0.92
    assert find_regions(prob, 0.5, min_area_px=3) == regions[:1]
    assert find_regions(prob, 0.995) == []


def test_mask_encoding_and_upsample():
    prob = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    np.testing.assert_array_equal(to_mask_u8(prob), [[0, 255], [128, 64]])
    up = upsample(prob, 8, 6)
    assert up.shape == (6, 8) and up.min() >= 0.0 and up.max() <= 1.0
    # Bilinear on pixel centres: the corners keep the corner cells' values (not transposed), and between
    # them values blend (not nearest-neighbour): the top row rises from 0 to 1 through 0.375 at x = 3.
    np.testing.assert_allclose([up[0, 0], up[0, -1], up[-1, 0], up[-1, -1]], [0.0, 1.0, 0.5, 0.25], atol=1e-6)
    assert abs(up[0, 3] - 0.375) < 1e-6 and all(np.diff(up[0]) >= 0)


def test_overlay_marks_the_hot_area():
    image = np.full((120, 160, 3), 128, np.uint8)
    logits = np.full((120, 160), -8.0, np.float32)
    logits[60:100, 100:150] = 8.0
    for mode in MAP_MODES:
        out = overlay(image, logits, 0.9, 0.5, 0.0, mode=mode)
        assert out.shape == image.shape and out.dtype == np.uint8
        hot, cold = out[80, 125], out[100, 20]
        assert hot[0] > hot[2] and cold[2] > cold[0], mode  # jet: red where the defect is, blue elsewhere
        assert not np.array_equal(out[:12, :40], cv2.addWeighted(image, 0.65, image, 0.35, 0)[:12, :40])  # label drawn


def _red(picture: np.ndarray) -> np.ndarray:
    """Pixels the jet map made red (RGB): red well above blue."""
    return picture[..., 0].astype(int) > picture[..., 2].astype(int) + 40


def test_the_relative_map_is_red_where_the_regions_are_cut_not_over_a_confident_frame():
    """A confident defect frame: every logit >= 3 (probability > 0.95), a hot spot at 9, the rule minmax:0.85. The
    probability map is red nearly everywhere; the relative map only inside the published region, green at its
    edge, blue elsewhere."""
    from inspectd.model.masks import MaskRule
    from inspectd.pipeline.postprocess import locate

    image = np.full((120, 160, 3), 128, np.uint8)
    cam = np.full((6, 8), 3.0, np.float32)
    cam[2:4, 5:7] = 9.0
    found = locate(cam, 160, 120, MaskRule("minmax", 0.85), True)
    region = found.kept > 0
    assert 0.02 < region.mean() < 0.15
    probability = overlay(image, found.logits, 0.99, 0.5, found.mask_logit, region, found.regions, mode="probability")
    relative = overlay(image, found.logits, 0.99, 0.5, found.mask_logit, region, found.regions, mode="relative")
    assert _red(probability).mean() > 0.8
    body = cv2.erode(region.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # away from the white contour
    assert _red(relative)[body].mean() > 0.9
    outside = cv2.dilate(region.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
    outside[80:, 100:] = outside[:25, :] = False  # the legend and the verdict (red text)
    assert _red(relative)[outside].mean() < 0.01
    # The same from the logits alone, without the regions to agree with (the live view draws it so).
    alone = overlay(image, found.logits, 0.99, 0.5, found.mask_logit, None, found.regions, mode="relative")
    assert _red(alone)[body].mean() > 0.9 and _red(alone)[outside].mean() < 0.01


def test_the_relative_map_leaves_a_frame_judged_ok_unpainted():
    """An ok frame publishes no mask: the relative overlay blends no map (the frame shows through unchanged away from
    the verdict and the legend); the probability overlay does."""
    image = np.full((120, 160, 3), 128, np.uint8)
    logits = np.full((120, 160), -2.0, np.float32)
    logits[60:100, 100:150] = 4.0
    middle = (slice(30, 70), slice(20, 90))
    relative = overlay(image, logits, 0.2, 0.5, 1.0, mode="relative")
    probability = overlay(image, logits, 0.2, 0.5, 1.0, mode="probability")
    np.testing.assert_array_equal(relative[middle], image[middle])
    assert np.abs(probability[middle].astype(int) - 128).mean() > 20


def test_regions_attachment_reproduces_the_regions_where_the_probability_png_cannot():
    """A confidently defective frame whose whole map is above logit 8 (probability > 0.9997) and a
    per-image rule (minmax:0.9): the regions sit on the hot spot, but in the 8-bit probability PNG
    every pixel is 255, so no threshold on it gives them back. The `regions` PNG does, exactly, and
    holds only the regions that were kept (min_region_px removes the small one)."""
    import time

    from inspectd.frames import Frame
    from inspectd.model.masks import MaskRule
    from inspectd.pipeline.postprocess import InspectOptions, inspect

    logits = np.full((12, 16), 9.0, np.float32)
    logits[3:5, 4:7] = 20.0  # the defect
    logits[9:11, 13:15] = 20.0  # a speck: a region of its own, smaller than the defect
    frame = Frame("cam1", 1, time.time(), time.monotonic(), np.zeros((96, 128, 3), np.uint8))

    def run(min_region_px):
        return inspect(
            frame, 0.99, logits, InspectOptions(threshold=0.5, mask_rule=MaskRule("minmax", 0.9), min_region_px=min_region_px)
        )

    both = run(1)
    assert len(both.regions) == 2  # the speck is a region when nothing is filtered...
    insp = run(both.regions[1].area_px + 1)  # ...and is left out of the regions and of their PNG when it is too small
    prob_png = cv2.imdecode(np.frombuffer(insp.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert prob_png.min() == 255  # saturated: useless for binarizing at mask_threshold
    assert insp.mask_threshold > 254.5 / 255
    regions_png = cv2.imdecode(np.frombuffer(insp.regions_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert regions_png.shape == (96, 128) and set(np.unique(regions_png)) == {0, 255}
    assert len(insp.regions) == 1
    assert find_regions(regions_png.astype(np.float32), 128) == [type(r)(r.bbox, r.area_px, 255.0, 255.0) for r in insp.regions]
    x, y, w, h = insp.regions[0].bbox
    assert 24 <= x and x + w <= 64 and 16 <= y and y + h <= 48  # around cells 4..6 x 3..4 (8 px each)


def test_an_ok_frame_costs_no_map_unless_results_are_published(monkeypatch):
    """An ok frame without `results` skips the frame-size map and the PNGs; its threshold is the full path's."""
    import time

    from inspectd.frames import Frame
    from inspectd.model.masks import MaskRule
    from inspectd.pipeline import postprocess
    from inspectd.pipeline.postprocess import InspectOptions, inspect

    calls = []
    monkeypatch.setattr(postprocess, "upsample", lambda *a: calls.append(a) or upsample(*a))

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame = Frame("cam", 7, time.time(), time.monotonic(), image)
    logits = np.random.default_rng(1).normal(-3, 2, (6, 8)).astype(np.float32)
    rule = MaskRule.parse("quantile:0.9")  # a per-frame threshold, from the map itself
    lean = inspect(frame, 0.1, logits, InspectOptions(threshold=0.5, mask_rule=rule))
    assert calls == []  # no map scaled to frame size
    full = inspect(frame, 0.1, logits, InspectOptions(threshold=0.5, mask_rule=rule, results=True))
    assert len(calls) == 1
    assert not lean.is_defect and lean.mask_png == b"" and lean.regions_png == b"" and lean.regions == ()
    assert full.mask_png != b"" and full.mask_size == lean.mask_size == (64, 48)
    assert lean.mask_threshold == full.mask_threshold and 0 < lean.mask_threshold < 1
    cam = inspect(frame, 0.1, logits, InspectOptions(threshold=0.5, mask_rule=rule, mask_resolution="cam"))
    assert cam.mask_size == (8, 6) and cam.mask_png == b""
    # Archived ok frames still keep their frame.
    kept = inspect(frame, 0.1, logits, InspectOptions(threshold=0.5, archive_frame="png", archive_ok_every=7))
    assert kept.archive_frame[:4] == b"\x89PNG" and kept.archive_encoding == "png" and kept.mask_png == b""


def test_infer_and_the_live_view_draw_the_same_picture():
    """One drawing (inspectd.drawing.draw) for infer/watch and the live view: the same frame and CAM give the
    same picture, but for JPEG and the live view's 256-step colour lookup (the frame alone is 37 levels away)."""
    import time

    from inspectd.frames import Frame
    from inspectd.outputs.live import Seen, render
    from inspectd.pipeline.postprocess import InspectOptions, locate

    image = np.dstack([np.tile(np.linspace(60, 200, 320, dtype=np.float32), (240, 1))] * 3).astype(np.uint8)
    logits = np.full((15, 20), -5.0, np.float32)
    logits[4:8, 10:15] = 5.0
    opts = InspectOptions(threshold=0.5)
    found = locate(logits, 320, 240, opts.mask_rule, True)
    for mode in MAP_MODES:
        jpeg = render(Seen(Frame("cam", 1, time.time(), time.monotonic(), image), 0.9, logits, opts), 320, mode)
        live = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)
        drawn = overlay(image, found.logits, 0.9, 0.5, found.mask_logit, found.kept, found.regions, mode).astype(int)
        assert np.abs(drawn - live).mean() < 4 and np.percentile(np.abs(drawn - live), 99) < 40, mode
        assert np.abs(image.astype(int) - live).mean() > 30
