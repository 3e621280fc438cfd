"""Image-, pixel- and region-level quality metrics (scikit-learn for ROC/PR/AUC, OpenCV for regions; ours are tested)."""

from __future__ import annotations

__all__ = [
    "image_metrics",
    "best_f1_threshold",
    "iou_dice",
    "minmax_map",
    "pro_curve",
    "aupro",
    "image_region_counts",
    "region_metrics",
]

import cv2
import numpy as np
from sklearn import metrics


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest F1 (from the precision-recall curve)."""
    precision, recall, thresholds = metrics.precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))]) if len(thresholds) else 0.5


def _at(labels, scores, threshold: float) -> dict:
    pred = scores >= threshold
    return {
        "threshold": float(threshold),
        "accuracy": float(metrics.accuracy_score(labels, pred)),
        "precision": float(metrics.precision_score(labels, pred, zero_division=0)),
        "recall": float(metrics.recall_score(labels, pred, zero_division=0)),
        "f1": float(metrics.f1_score(labels, pred, zero_division=0)),
    }


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """ROC-AUC, AP, and accuracy/precision/recall/F1 at `threshold` and at the best-F1 threshold."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    both = len(np.unique(labels)) == 2
    return {
        "roc_auc": float(metrics.roc_auc_score(labels, scores)) if both else float("nan"),
        "average_precision": float(metrics.average_precision_score(labels, scores)) if both else float("nan"),
        **_at(labels, scores, threshold),
        "best_f1": _at(labels, scores, best_f1_threshold(labels, scores)) if both else None,
    }


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """IoU and Dice of two boolean masks (1.0 each when both are empty)."""
    inter = np.logical_and(pred, truth).sum()
    a, b = pred.sum(), truth.sum()
    union = a + b - inter
    if union == 0:
        return 1.0, 1.0
    return float(inter / union), float(2 * inter / (a + b))


def minmax_map(cam: np.ndarray, score: float, threshold: float = 0.5) -> np.ndarray:
    """The reference's display map: per-image min-max scaled CAM, zeroed when score < threshold (its 0.5)."""
    if score < threshold:
        return np.zeros_like(cam, dtype=np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    return ((cam - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(cam, dtype=np.float32)


# --- Localization metrics of the field: AUPRO (MVTec AD / anomalib) and region-level counts. ---------------------------
# Both label connected regions with OpenCV at 8-connectivity: the daemon's `find_regions` does, and so do MVTec AD's
# reference code (scipy.ndimage.label with a 3x3 structure) and anomalib (cv2.connectedComponents' default).


def _images(arrays) -> list[np.ndarray]:
    """An (N, H, W) array or a sequence of 2-D arrays (sizes may differ) as a list of 2-D arrays."""
    out = [np.asarray(a) for a in arrays]
    if any(a.ndim != 2 for a in out):
        raise ValueError("expected 2-D maps/masks, one per image")
    return out


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Number of 8-connected regions of a mask and its label image (0 = background, 1..n = regions)."""
    n, labels = cv2.connectedComponents((np.asarray(mask) != 0).astype(np.uint8), connectivity=8)
    return n - 1, labels


def pro_curve(maps, masks, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-region-overlap curve: (fpr, pro, thresholds) from (0, 0) at +inf down to (1, 1), pixel >= threshold."""
    maps, masks = _images(maps), _images(masks)
    if len(maps) != len(masks) or any(m.shape != g.shape for m, g in zip(maps, masks)):
        raise ValueError("maps and masks must pair up with the same shapes")
    values = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    # Each defect pixel carries 1 / (its region's area); summing over the pixels at or above a threshold gives, per
    # region, the overlap fraction, so the sum over all regions / region count is PRO. Negatives count for FPR.
    region_weight = np.zeros(values.size)
    negative = np.zeros(values.size, bool)
    n_regions, start = 0, 0
    for g in masks:
        n, labels = _components(g)
        labels = labels.ravel()
        if n:
            inverse_area = np.zeros(n + 1)
            inverse_area[1:] = 1.0 / np.bincount(labels, minlength=n + 1)[1:]
            region_weight[start : start + labels.size] = inverse_area[labels]
        negative[start : start + labels.size] = labels == 0
        n_regions += n
        start += labels.size
    n_neg = int(negative.sum())
    if n_regions == 0 or n_neg == 0:
        raise ValueError("AUPRO needs at least one defect region and one defect-free pixel")
    if num_thresholds is None:
        # Exact: every distinct map value is a threshold (the MVTec AD reference does the same by sorting).
        thresholds, bin_of = np.unique(values, return_inverse=True)
    else:
        # Approximate, constant memory in the curve: quantiles of the values (dense where the values are), min included
        # so the curve still ends at (1, 1); a pixel belongs to the highest threshold it reaches.
        thresholds = np.unique(np.quantile(values, np.linspace(0.0, 1.0, int(num_thresholds))))
        bin_of = np.searchsorted(thresholds, values, side="right") - 1
    n_bins = thresholds.size
    # Reverse cumulative sums over bins = totals at or above each threshold, highest threshold first.
    neg_at = np.cumsum(np.bincount(bin_of, weights=negative, minlength=n_bins)[::-1])
    pro_at = np.cumsum(np.bincount(bin_of, weights=region_weight, minlength=n_bins)[::-1])
    fpr = np.concatenate([[0.0], neg_at / n_neg])
    pro = np.concatenate([[0.0], pro_at / n_regions])
    return fpr, np.minimum(pro, 1.0), np.concatenate([[np.inf], thresholds[::-1]])


def aupro(maps, masks, max_fpr: float = 0.3, num_thresholds: int | None = None) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (MVTec AD / anomalib AUPRO; 8-connected)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError("max_fpr must be in (0, 1]")
    fpr, pro, _ = pro_curve(maps, masks, num_thresholds)
    # Cut the curve at exactly max_fpr, interpolating linearly between the two points around it (the curve ends at
    # fpr 1.0, so the point after exists whenever the cut falls short); fpr is non-decreasing, as metrics.auc needs.
    i = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:i], pro[:i]
    if x[-1] < max_fpr:
        y_cut = pro[i - 1] + (pro[i] - pro[i - 1]) * (max_fpr - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x, y = np.append(x, max_fpr), np.append(y, y_cut)
    return float(metrics.auc(x, y) / max_fpr)


def image_region_counts(pred: np.ndarray, truth: np.ndarray, min_area_px: int = 1, min_overlap_px: int = 1) -> dict:
    """Region counts of one image: true regions found, predicted regions on a defect (8-connected, pairwise overlap)."""
    n_true, true_labels = _components(truth)
    n_pred, pred_labels = _components(pred)
    if n_pred and min_area_px > 1:  # drop small predicted regions, as the daemon does (min_region_px)
        area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        keep = np.flatnonzero(area >= min_area_px)
        keep = keep[keep > 0]
        remap = np.zeros(n_pred + 1, np.int64)
        remap[keep] = np.arange(1, keep.size + 1)
        pred_labels, n_pred = remap[pred_labels], int(keep.size)
    # Overlap in pixels of every (predicted, true) region pair, background row/column 0 included: a joint histogram
    # of the two label images (one bincount; sklearn's contingency_matrix would need sparse handling for no gain).
    overlap = np.bincount(
        pred_labels.ravel().astype(np.int64) * (n_true + 1) + true_labels.ravel(),
        minlength=(n_pred + 1) * (n_true + 1),
    ).reshape(n_pred + 1, n_true + 1)[1:, 1:]
    hit = overlap >= max(int(min_overlap_px), 1)
    return {
        "true_regions": int(n_true),
        "true_regions_found": int(hit.any(axis=0).sum()),
        "pred_regions": int(n_pred),
        "pred_regions_correct": int(hit.any(axis=1).sum()),
        "defect_free": bool(not np.any(truth)),
    }


def region_metrics(pred_masks, true_masks, min_area_px: int = 1, min_overlap_px: int = 1) -> dict:
    """Region recall and precision, region counts and the false-region rate on defect-free images, over a dataset."""
    preds, truths = _images(pred_masks), _images(true_masks)
    if len(preds) != len(truths) or any(p.shape != t.shape for p, t in zip(preds, truths)):
        raise ValueError("predicted and true masks must pair up with the same shapes")
    per_image = [image_region_counts(p, t, min_area_px, min_overlap_px) for p, t in zip(preds, truths)]
    total = {
        k: sum(c[k] for c in per_image) for k in ("true_regions", "true_regions_found", "pred_regions", "pred_regions_correct")
    }
    ok = [c for c in per_image if c["defect_free"]]
    ok_with_region = sum(1 for c in ok if c["pred_regions"] > 0)

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "region_recall": ratio(total["true_regions_found"], total["true_regions"]),
        "region_precision": ratio(total["pred_regions_correct"], total["pred_regions"]),
        **total,
        "images": len(per_image),
        "defect_free_images": len(ok),
        "defect_free_images_with_region": ok_with_region,
        "false_region_rate": ratio(ok_with_region, len(ok)),
    }
