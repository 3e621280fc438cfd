"""Mask rules: how a CAM becomes the published mask, regions and per-frame mask_threshold."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from inspectd.frames import Frame
from inspectd.pipeline.postprocess import MASK_RULES, InspectOptions, MaskRule, inspect
from inspectd.toolkit.localize import RULE_GRIDS, Sample, mean_defect_iou, pick_mask_rule, published_mask

# A 4 x 5 CAM: background logits around 1 (a confidently defective GAP map sits high everywhere),
# one hot cell at (1, 3).
CAM = np.array(
    [[1.0, 1.2, 0.8, 1.1, 0.9], [1.0, 0.9, 1.3, 7.0, 1.0], [0.7, 1.1, 1.0, 1.2, 0.8], [1.0, 0.9, 1.0, 1.1, 1.0]], np.float32
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_logit_thresholds_by_definition():
    x = CAM.astype(np.float64)
    assert MaskRule("probability", 0.5).logit_threshold(CAM) == pytest.approx(0.0)
    assert MaskRule("probability", 0.9).logit_threshold(CAM) == pytest.approx(math.log(9))
    assert MaskRule("relative", 2.0).logit_threshold(CAM) == pytest.approx(x.mean() + 2.0)
    assert MaskRule("quantile", 0.95).logit_threshold(CAM) == pytest.approx(np.quantile(x, 0.95))
    assert MaskRule("minmax", 0.5).logit_threshold(CAM) == pytest.approx(0.7 + 0.5 * (7.0 - 0.7))
    assert MaskRule("minmax", 0.5).logit_threshold(np.ones((2, 2))) == math.inf  # a flat map has no mask


def test_parse_and_ranges():
    assert MaskRule.parse("relative:2.5") == MaskRule("relative", 2.5)
    assert MaskRule.parse("quantile") == MaskRule("quantile", MASK_RULES["quantile"][2])
    for bad in ("mean:1", "probability:1.5", "quantile:-0.1", "minmax:x", "relative:nan"):
        with pytest.raises(ValueError):
            MaskRule.parse(bad)
    for kind, grid in RULE_GRIDS.items():  # every searched parameter is a valid rule, the default among them
        for p in grid:
            MaskRule(kind, float(p))  # raises ValueError outside the rule's range
        assert MASK_RULES[kind][2] in [float(p) for p in grid]


def _frame(w=50, h=40) -> Frame:
    return Frame("cam", 1, time.time(), time.monotonic(), np.zeros((h, w, 3), np.uint8))


def test_inspect_publishes_the_rules_per_frame_threshold_and_tight_regions():
    """On a map that sits high everywhere, a fixed 0.5 covers the frame; the relative rule finds the hot cell."""
    fixed = inspect(_frame(), 0.9, CAM, InspectOptions(threshold=0.5, mask_rule=MaskRule("probability", 0.5)))
    relative = inspect(_frame(), 0.9, CAM, InspectOptions(threshold=0.5, mask_rule=MaskRule("relative", 2.0)))
    assert fixed.mask_threshold == pytest.approx(0.5)
    assert relative.mask_threshold == pytest.approx(_sigmoid(float(CAM.astype(np.float64).mean()) + 2.0))
    assert sum(r.area_px for r in fixed.regions) == 50 * 40  # every logit is > 0
    (hot,) = relative.regions
    x, y, w, h = hot.bbox
    assert 20 <= x + w / 2 <= 40 and 5 <= y + h / 2 <= 20  # around cell (row 1, column 3) of a 10 px grid
    assert hot.area_px < 0.1 * 50 * 40


def test_regions_follow_the_upsampled_logits():
    """The regions are `upsample(logits) >= logit threshold` exactly: the same pixels as published_mask."""
    rule = MaskRule("quantile", 0.9)
    insp = inspect(_frame(), 0.9, CAM, InspectOptions(threshold=0.5, mask_rule=rule))
    expected = published_mask(Sample(CAM, 0.9, np.zeros((40, 50), bool)), rule, 0.5)
    assert sum(r.area_px for r in insp.regions) == int(expected.sum()) > 0


def test_no_regions_on_a_frame_judged_ok():
    insp = inspect(_frame(), 0.2, CAM, InspectOptions(threshold=0.5, mask_rule=MaskRule("relative", 2.0)))
    assert insp.regions == () and not insp.is_defect
    assert not published_mask(Sample(CAM, 0.2, np.zeros((40, 50), bool)), MaskRule("relative", 2.0), 0.5).any()


def test_pick_mask_rule_finds_the_parameter_that_fits_the_defects():
    """Defects exactly where the map is hot: the search picks a relative parameter that isolates them."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(6):
        cam = rng.normal(0.0, 0.3, (8, 8)).astype(np.float32) + 2.0
        r, c = rng.integers(1, 7, 2)
        cam[r, c] += 5.0
        truth = np.zeros((80, 80), bool)
        truth[r * 10 : (r + 1) * 10, c * 10 : (c + 1) * 10] = True
        samples.append(Sample(cam, 0.95, truth))
    samples.append(Sample(rng.normal(0, 0.3, (8, 8)).astype(np.float32) - 3, 0.05, np.zeros((80, 80), bool)))
    rule, curve = pick_mask_rule(samples, "relative", 0.5)
    assert curve[rule.param] == max(curve.values()) and curve[rule.param] > 0.4
    assert mean_defect_iou(samples, MaskRule("probability", 0.5), 0.5) < 0.05  # everything is above 0.5
    assert 1.0 <= rule.param <= 5.0
