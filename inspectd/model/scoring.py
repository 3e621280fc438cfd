"""Image-level and pixel-level quality metrics (scikit-learn for ROC/PR; IoU/Dice are ours, tested)."""

from __future__ import annotations

__all__ = ["image_metrics", "best_f1_threshold", "iou_dice", "minmax_map"]

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


def minmax_map(cam: np.ndarray, score: float) -> np.ndarray:
    """The reference's display map: per-image min-max scaled CAM, zeroed when score < 0.5."""
    if score < 0.5:
        return np.zeros_like(cam, dtype=np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    return ((cam - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(cam, dtype=np.float32)
