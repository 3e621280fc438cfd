"""Our own metric code (IoU, Dice, min-max map, best-F1 threshold) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from inspectd.toolkit.scoring import best_f1_threshold, image_metrics, iou_dice, minmax_map


def test_iou_dice_known_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, :3] = True  # 6 px, overlap 4
    assert iou_dice(a, b) == pytest.approx((4 / 6, 2 * 4 / 10))
    assert iou_dice(a, ~a) == (0.0, 0.0)
    assert iou_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(arrays(bool, (6, 7)), arrays(bool, (6, 7)))
def test_iou_dice_properties(a, b):
    iou, dice = iou_dice(a, b)
    assert 0.0 <= iou <= dice <= 1.0
    assert iou_dice(b, a) == (iou, dice)
    assert dice == pytest.approx(2 * iou / (1 + iou))  # the identity between the two


def test_minmax_map_reference_behaviour():
    cam = np.array([[1.0, 3.0], [2.0, 5.0]], np.float32)
    np.testing.assert_allclose(minmax_map(cam, 0.9), [[0.0, 0.5], [0.25, 1.0]])
    assert not minmax_map(cam, 0.4).any()  # the reference zeroes the map below score 0.5
    assert not minmax_map(cam, 0.9, threshold=0.95).any()  # gated at the evaluation's threshold when given
    assert not minmax_map(np.ones((2, 2), np.float32), 0.9).any()


def test_best_f1_threshold_separable():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    thr = best_f1_threshold(labels, scores)
    assert 0.3 < thr <= 0.7
    m = image_metrics(labels, scores, 0.5)
    assert m["roc_auc"] == 1.0 and m["f1"] == 1.0 and m["best_f1"]["f1"] == 1.0


def test_image_metrics_at_threshold_matches_counts():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.6, 0.2, 0.7, 0.4])  # at 0.5: TP 1, FP 1, FN 1, TN 1
    m = image_metrics(labels, scores, 0.5)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["roc_auc"] == pytest.approx(0.75)
