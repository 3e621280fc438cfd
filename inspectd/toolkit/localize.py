"""From CAMs to masks, as the daemon publishes them, and the search for a mask rule's parameter.

`published_mask` is exactly what the daemon's regions cover (inspectd.pipeline.postprocess): the
logits upsampled to image size, thresholded at the rule's per-image logit threshold, on images
judged defective only. `pick_mask_rule` searches a rule's parameter on validation images with
masks (mean IoU over defect images); train stores the winner in the model, evaluate reports it.
"""

from __future__ import annotations

__all__ = ["Sample", "RULE_GRIDS", "logit_map", "published_mask", "mean_defect_iou", "pick_mask_rule"]

from dataclasses import dataclass

import numpy as np

from inspectd.model.masks import MaskRule
from inspectd.pipeline.postprocess import upsample
from inspectd.toolkit.scoring import iou_dice

# The parameter grid searched for each rule (the defaults of MASK_RULES are on them).
RULE_GRIDS = {
    "probability": tuple(np.round(np.concatenate([np.arange(0.05, 0.96, 0.05), [0.98, 0.99, 0.995, 0.999]]), 3)),
    "relative": tuple(np.round(np.arange(-1.0, 10.01, 0.25), 2)),
    "quantile": (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999),
    "minmax": tuple(np.round(np.arange(0.1, 0.96, 0.05), 2)),
}


@dataclass(frozen=True)
class Sample:
    """One evaluated image: its CAM logits, score, and ground truth (bool, image size; all False for ok)."""

    cam_logits: np.ndarray
    score: float
    truth: np.ndarray


def logit_map(cam_logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The CAM logits upsampled (bilinear) to image size, in float64 (no saturation ties)."""
    return upsample(np.asarray(cam_logits, np.float64), width, height)


def published_mask(sample: Sample, rule: MaskRule, threshold: float, logits: np.ndarray | None = None) -> np.ndarray:
    """The pixels the daemon's regions would cover: empty unless score >= threshold."""
    h, w = sample.truth.shape
    if sample.score < threshold:
        return np.zeros((h, w), bool)
    logits = logit_map(sample.cam_logits, w, h) if logits is None else logits
    return logits >= rule.logit_threshold(sample.cam_logits)


def mean_defect_iou(samples: list[Sample], rule: MaskRule, threshold: float, cache: dict | None = None) -> float:
    """Mean IoU of the published mask over images with a defect (an image judged ok scores 0)."""
    ious = []
    for i, s in enumerate(samples):
        if not s.truth.any():
            continue
        logits = cache.get(i) if cache is not None else None
        if logits is None:
            logits = logit_map(s.cam_logits, s.truth.shape[1], s.truth.shape[0])
            if cache is not None:
                cache[i] = logits
        ious.append(iou_dice(published_mask(s, rule, threshold, logits), s.truth)[0])
    return float(np.mean(ious)) if ious else float("nan")


def pick_mask_rule(
    samples: list[Sample], kind: str, threshold: float, cache: dict | None = None
) -> tuple[MaskRule, dict[float, float]]:
    """The parameter of rule `kind` with the best mean defect IoU on `samples`; also the whole curve.

    `cache` ({sample index: logit map}) lets callers that already upsampled the maps share them."""
    cache = {} if cache is None else cache
    curve = {float(p): mean_defect_iou(samples, MaskRule(kind, float(p)), threshold, cache) for p in RULE_GRIDS[kind]}
    best = max(curve, key=lambda p: curve[p])  # the first of equals, in grid order
    return MaskRule(kind, best), curve
