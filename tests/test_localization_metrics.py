"""AUPRO and region-level metrics against hand-computed cases (8-connected regions, pixel >= threshold is positive)."""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest

from inspectd.toolkit.scoring import aupro, image_region_counts, pro_curve, region_metrics


def _hand_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two 4x4 images: A has a 1-px and a 3-px defect, B is defect-free; maps take the values 0, 0.2, 0.5, 0.9."""
    mask_a = np.zeros((4, 4), bool)
    mask_a[0, 0] = True  # region R1, 1 px
    mask_a[3, 1:4] = True  # region R2, 3 px (not touching R1, even diagonally)
    map_a = np.zeros((4, 4))
    map_a[0, 0] = 0.9  # R1
    map_a[3, 1:4] = [0.9, 0.5, 0.2]  # R2
    map_a[0, 3] = 0.5  # a negative pixel
    mask_b = np.zeros((4, 4), bool)
    map_b = np.zeros((4, 4))
    map_b[0, 0] = 0.9
    map_b[1, 1] = 0.5
    map_b[2, :] = 0.2
    map_b[3, :] = 0.2
    map_b[1, 2:4] = 0.2  # 10 pixels at 0.2 in all
    return [map_a, map_b], [mask_a, mask_b]


def test_pro_curve_hand_computed_points():
    """Negatives: 12 in A + 16 in B = 28; regions: R1 (1 px) and R2 (3 px).

    t = 0.9: R1 1/1, R2 1/3 -> PRO (1 + 1/3) / 2 = 2/3; negatives >= 0.9: B[0,0] -> FPR 1/28
    t = 0.5: R2 2/3 -> PRO (1 + 2/3) / 2 = 5/6; negatives: + A[0,3], B[1,1] -> FPR 3/28
    t = 0.2: R2 3/3 -> PRO 1; negatives: + 10 in B -> FPR 13/28
    t = 0.0: everything -> (1, 1); and (0, 0) at +inf.
    """
    maps, masks = _hand_case()
    fpr, pro, thr = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 1 / 28, 3 / 28, 13 / 28, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 2 / 3, 5 / 6, 1, 1], atol=1e-12)
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.2, 0.0])


def test_aupro_hand_computed_area():
    """Trapezoids of the curve above up to FPR 0.3 = 8.4/28, then / 0.3.

    (0, 0) -> (1/28, 2/3):      1/28 * (0 + 2/3) / 2          = 1/84
    (1/28, 2/3) -> (3/28, 5/6): 2/28 * (2/3 + 5/6) / 2        = 3/56
    cut at 0.3 on (3/28, 5/6) -> (13/28, 1): slope (1/6) / (10/28) = 7/15,
      PRO(0.3) = 5/6 + (8.4/28 - 3/28) * 7/15 = 5/6 + 27/140 * 7/15 = 277/300
      area 27/140 * (5/6 + 277/300) / 2 = 14229/84000
    total 1000/84000 + 4500/84000 + 14229/84000 = 19729/84000; / 0.3 = 19729/25200 = 0.78290 (to 5 places).
    """
    maps, masks = _hand_case()
    expected = Fraction(1, 84) + Fraction(3, 56) + Fraction(27, 140) * (Fraction(5, 6) + Fraction(277, 300)) / 2
    assert expected == Fraction(19729, 84000)
    assert aupro(maps, masks) == pytest.approx(float(expected / Fraction(3, 10)), abs=1e-9)
    # Up to FPR 1 the whole curve counts: 1/84 + 3/56 + 10/28 * (5/6 + 1) / 2 + 15/28 * 1 = 13/14.
    whole = Fraction(1, 84) + Fraction(3, 56) + Fraction(10, 28) * (Fraction(5, 6) + 1) / 2 + Fraction(15, 28)
    assert whole == Fraction(13, 14)
    assert aupro(maps, masks, max_fpr=1.0) == pytest.approx(13 / 14, abs=1e-9)
    # A cut exactly on a curve point needs no interpolation: up to 3/28 the area is 1/84 + 3/56.
    assert aupro(maps, masks, max_fpr=3 / 28) == pytest.approx((1 / 84 + 3 / 56) / (3 / 28), abs=1e-9)


def test_aupro_regions_are_8_connected():
    """A 1-px defect touching a 2-px one only diagonally is one 3-px region (4-connected: two regions, PRO 1/2)."""
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    mask[1, 1:3] = True
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    fpr, pro, _ = pro_curve([heat], [mask])
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(1 / 3))


def test_aupro_perfect_constant_inverted():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:5, 3:9] = True
    masks[0, 10:12, 10:12] = True
    masks[1, 0:1, 0:1] = True  # image 2 is defect-free
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    # Any ordering inside the defects is still perfect as long as every defect pixel beats every negative.
    ranked = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(ranked, masks) == pytest.approx(1.0)
    # A constant map has one threshold: the curve is the diagonal (0, 0) -> (1, 1), area max_fpr^2 / 2, normalized max_fpr / 2.
    assert aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15)
    assert aupro(np.full(masks.shape, 0.7), masks, max_fpr=1.0) == pytest.approx(0.5)
    # Defects strictly below every negative: PRO stays 0 until FPR reaches 1.
    assert aupro(1.0 - ranked, masks) == pytest.approx(0.0)


def test_aupro_random_map_is_about_max_fpr_over_2():
    """Random maps give PRO ~ FPR, so the area up to 0.3 is ~0.3^2/2 and the normalized AUPRO ~0.15 (not 0.5)."""
    rng = np.random.default_rng(42)
    masks = np.zeros((40, 64, 64), bool)
    for i in range(0, 40, 2):  # half the images defect-free; 20 regions of 6x6 to 15x15 px (std over seeds ~0.005)
        y, x = rng.integers(0, 48, 2)
        h, w = rng.integers(6, 16, 2)
        masks[i, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape)
    assert aupro(maps, masks) == pytest.approx(0.15, abs=0.02)
    # The quantile grid is close to the exact curve.
    assert aupro(maps, masks, num_thresholds=1000) == pytest.approx(aupro(maps, masks), abs=2e-3)


def test_aupro_quantile_grid_and_mixed_sizes():
    maps, masks = _hand_case()
    # Images of different sizes go in as lists.
    big_mask = np.zeros((5, 7), bool)
    big_map = np.zeros((5, 7))
    assert 0.0 <= aupro([*maps, big_map], [*masks, big_mask]) <= 1.0
    # The 32 values sorted: 15 x 0, 11 x 0.2, 3 x 0.5, 3 x 0.9. A threshold between two neighbouring values selects
    # the same pixels as the upper one, so the grid reproduces the exact curve (with repeated points) when each gap
    # (0, 0.2], (0.2, 0.5], (0.5, 0.9] holds a grid value: 33 quantiles give 0.106..., 0.5 and 0.9 among others.
    assert aupro(maps, masks, num_thresholds=33) == pytest.approx(aupro(maps, masks), abs=1e-9)


def test_aupro_rejects_undefined_cases():
    with pytest.raises(ValueError):
        aupro([np.zeros((3, 3))], [np.zeros((3, 3), bool)])  # no defect region
    with pytest.raises(ValueError):
        aupro([np.zeros((3, 3))], [np.ones((3, 3), bool)])  # no negative pixel
    with pytest.raises(ValueError):
        aupro([np.zeros((3, 3))], [np.zeros((3, 4), bool)])  # shapes differ


# --- region metrics ------------------------------------------------------------------------------------------------


def _blank() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((8, 8), bool), np.zeros((8, 8), bool)


def _region_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Six 8x8 images, (prediction, truth) each; the expected counts are in the comments."""
    cases = []
    p, t = _blank()  # 1. a hit: true 1 found 1; pred 1 correct 1
    t[1:4, 1:4] = True
    p[3:5, 3:5] = True  # overlaps the defect at (3, 3) only
    cases.append((p, t))
    p, t = _blank()  # 2. a miss plus a false region in a defect image: true 1 found 0; pred 1 correct 0
    t[0:2, 0:2] = True
    p[6:8, 6:8] = True
    cases.append((p, t))
    p, t = _blank()  # 3. two predicted regions on one defect: true 1 found 1; pred 2 correct 2
    t[2:6, 1:7] = True
    p[2:4, 1:3] = True
    p[4:6, 5:7] = True
    cases.append((p, t))
    p, t = _blank()  # 4. one predicted region spanning two defects: true 2 found 2; pred 1 correct 1
    t[1:3, 0:2] = True
    t[1:3, 5:7] = True
    p[2, 0:7] = True
    cases.append((p, t))
    p, t = _blank()  # 5. ok image with a 1-px region and a 4-px region (diagonal pixels: one 8-connected region)
    p[0, 0] = True
    p[5, 5] = p[6, 6] = p[7, 7] = p[4, 4] = True
    cases.append((p, t))
    p, t = _blank()  # 6. ok image without regions
    cases.append((p, t))
    return [c[0] for c in cases], [c[1] for c in cases]


def test_image_region_counts_each_case():
    preds, truths = _region_case()
    got = [image_region_counts(p, t) for p, t in zip(preds, truths)]
    want = [  # (true, found, pred, correct, defect-free)
        (1, 1, 1, 1, False),
        (1, 0, 1, 0, False),
        (1, 1, 2, 2, False),
        (2, 2, 1, 1, False),
        (0, 0, 2, 0, True),
        (0, 0, 0, 0, True),
    ]
    keys = ("true_regions", "true_regions_found", "pred_regions", "pred_regions_correct", "defect_free")
    assert [tuple(g[k] for k in keys) for g in got] == want


def test_region_metrics_totals():
    """Totals: true 1+1+1+2 = 5, found 1+0+1+2 = 4; pred 1+1+2+1+2 = 7, correct 1+0+2+1 = 4; ok images 2, 1 with a region."""
    preds, truths = _region_case()
    m = region_metrics(preds, truths)
    assert (m["true_regions"], m["true_regions_found"], m["pred_regions"], m["pred_regions_correct"]) == (5, 4, 7, 4)
    assert m["region_recall"] == pytest.approx(4 / 5)
    assert m["region_precision"] == pytest.approx(4 / 7)
    assert (m["images"], m["defect_free_images"], m["defect_free_images_with_region"]) == (6, 2, 1)
    assert m["false_region_rate"] == pytest.approx(1 / 2)
    # An (N, H, W) array works the same as a list.
    assert region_metrics(np.stack(preds), np.stack(truths)) == m


def test_region_metrics_min_area_and_min_overlap():
    preds, truths = _region_case()
    # min_area_px=2 drops the 1-px region of image 5 only: pred 6; the ok image 5 still has its 4-px diagonal region.
    m = region_metrics(preds, truths, min_area_px=2)
    assert (m["pred_regions"], m["pred_regions_correct"], m["false_region_rate"]) == (6, 4, 0.5)
    # min_area_px=5 keeps only image 4's 7-px row (every other region has 4 px or 1 px): pred 1, correct 1, and only
    # image 4's two defects are found (2 of 5); no ok image has a region any more.
    m = region_metrics(preds, truths, min_area_px=5)
    assert (m["pred_regions"], m["pred_regions_correct"], m["true_regions_found"]) == (1, 1, 2)
    assert m["region_recall"] == pytest.approx(2 / 5) and m["region_precision"] == 1.0
    assert m["false_region_rate"] == 0.0
    # min_overlap_px=2: image 1 overlaps by 1 px (miss now); image 4's row overlaps each defect by 2 px (still found).
    m = region_metrics(preds, truths, min_overlap_px=2)
    assert (m["true_regions_found"], m["pred_regions_correct"]) == (3, 3)


def test_region_metrics_undefined_ratios_are_nan():
    m = region_metrics([np.zeros((4, 4), bool)], [np.zeros((4, 4), bool)])
    assert np.isnan(m["region_recall"]) and np.isnan(m["region_precision"])
    assert m["false_region_rate"] == 0.0
    with pytest.raises(ValueError):
        region_metrics([np.zeros((4, 4), bool)], [np.zeros((4, 5), bool)])


def test_aupro_matches_brute_force_definition():
    """Against the definition written out: binarize at every distinct value, per-region fractions, global FPR."""
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 12, 12), bool)
    masks[0, 1:4, 1:6] = True
    masks[0, 8:11, 8:9] = True
    masks[2, 5:9, 2:10] = True  # images 1 and 3 defect-free
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)  # a dozen or so distinct values
    regions = []
    for i, m in enumerate(masks):
        n, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, labels == k) for k in range(1, n)]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & ~masks).sum() / (~masks).sum()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    x, y = np.array(points).T
    # np.interp is fine here: fpr only repeats where no negative pixel changes, and the cut lands between points.
    cut = 0.3
    keep = x <= cut
    xs, ys = np.append(x[keep], cut), np.append(y[keep], np.interp(cut, x, y))
    expected = np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / cut
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)
