"""`inspectd evaluate`: image-level and (with masks) pixel-level quality, calibrated vs min-max map.

Metrics: ROC-AUC, average precision, ROC/PR curves and the threshold metrics come from
scikit-learn; IoU/Dice (inspectd.toolkit.scoring.iou_dice) are our own, unit-tested code.
"""

from __future__ import annotations

__all__ = ["EvalOptions", "evaluate", "format_table", "truth_mask"]

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn import metrics

from inspectd.errors import DataError, UsageError
from inspectd.imageio import read_rgb
from inspectd.model.deployable import load_model, resolve_model_path
from inspectd.model.masks import MaskRule
from inspectd.pipeline.engine import Predictor
from inspectd.pipeline.postprocess import upsample
from inspectd.toolkit import dataset as datasets
from inspectd.toolkit.localize import RULE_GRIDS, Sample, logit_map, pick_mask_rule, published_mask
from inspectd.toolkit.scoring import aupro, image_metrics, iou_dice, minmax_map, region_metrics

# The same threshold search for both maps: a grid over (0, 1), the best mean IoU over defect images.
# The grid reaches 0.999 because calibrated maps of confidently defective images sit high everywhere.
THRESHOLDS = np.round(np.concatenate([np.arange(0.02, 0.99, 0.02), [0.99, 0.995, 0.999]]), 3)
# The model's own map; the same on images judged defective only (the others' maps at the bottom: events carry
# masks for defects only), gated exactly like the reference's per-image min-max display map, the third.
MAPS = ("calibrated", "gated", "minmax")


@dataclass(frozen=True)
class EvalOptions:
    model: Path
    dataset: Path
    report: Path | None = None
    batch_size: int = 8
    threshold: float | None = None  # image-level; None = the model's own
    mask_rule: str | None = None  # e.g. "relative:2"; None = the model's own


def _pixel_report(samples: list[Sample], rule: MaskRule, threshold: float) -> tuple[dict, dict]:
    """(the report's pixel block, {map: (fpr, tpr)} for the ROC plot).

    First what the daemon publishes (the model's own mask rule, regions on images judged defective
    only), then the maps' threshold-free quality (pixel ROC-AUC, AUPRO) and the oracles (the best
    parameter of each rule chosen on this very data: indicative only, never a model setting)."""
    truths = [s.truth for s in samples]
    defect = [s for s in samples if s.truth.any()]
    logits = [logit_map(s.cam_logits, s.truth.shape[1], s.truth.shape[0]) for s in samples]
    published = [published_mask(s, rule, threshold, lg) for s, lg in zip(samples, logits)]
    pairs = [iou_dice(m, s.truth) for m, s in zip(published, samples) if s.truth.any()]
    regions = region_metrics(published, truths)
    out: dict = {
        "n_defect_images": len(defect),
        "n_pixels": int(sum(t.size for t in truths)),
        "published": {
            "mask_rule": str(rule),
            "iou": float(np.mean([p[0] for p in pairs])),
            "dice": float(np.mean([p[1] for p in pairs])),
            **{k: _num(v) for k, v in regions.items()},
        },
        "peak_in_defect": float(
            np.mean([_peak_hit(lg, s.truth, _cell_px(s)) for lg, s in zip(logits, samples) if s.truth.any()])
        ),
    }
    gated_out = min(float(lg.min()) for lg in logits) - 1.0  # below every real logit: judged ok, ranked last
    maps = {
        "calibrated": logits,  # sigmoid is monotonic: the logits rank pixels as the probabilities do
        "gated": [lg if s.score >= threshold else np.full_like(lg, gated_out) for lg, s in zip(logits, samples)],
        "minmax": [upsample(minmax_map(s.cam_logits, s.score, threshold), *s.truth.shape[::-1]) for s in samples],
    }
    truth_flat = np.concatenate([t.ravel() for t in truths])
    rocs = {}
    for name, images in maps.items():
        flat = np.concatenate([m.ravel() for m in images])
        grid = THRESHOLDS if name == "minmax" else np.log(THRESHOLDS / (1 - THRESHOLDS))
        ious = np.array([[iou_dice(m >= t, s.truth) for t in grid] for m, s in zip(images, samples) if s.truth.any()])
        best = int(np.argmax(ious[:, :, 0].mean(axis=0)))
        out[name] = {
            "roc_auc": float(metrics.roc_auc_score(truth_flat, flat)),
            "aupro": aupro(images, truths),
            "iou": float(ious[:, best, 0].mean()),
            "dice": float(ious[:, best, 1].mean()),
            "threshold": float(THRESHOLDS[best]),
        }
        rocs[name] = metrics.roc_curve(truth_flat, flat)[:2]
    ungated = [iou_dice(lg >= rule.logit_threshold(s.cam_logits), s.truth) for lg, s in zip(logits, samples) if s.truth.any()]
    out["calibrated"]["at_model_threshold"] = {
        "mask_rule": str(rule),
        "iou": float(np.mean([p[0] for p in ungated])),
        "dice": float(np.mean([p[1] for p in ungated])),
    }
    out["oracle_rules"] = {}
    for kind in RULE_GRIDS:
        best_rule, curve = pick_mask_rule(samples, kind, threshold, dict(enumerate(logits)))
        out["oracle_rules"][kind] = {"param": best_rule.param, "iou": curve[best_rule.param]}
    return out, rocs


def _num(value):
    """JSON has no NaN: an undefined ratio (no regions at all) is null."""
    return None if isinstance(value, float) and np.isnan(value) else value


def _cell_px(s: Sample) -> int:
    h, w = s.truth.shape
    return int(np.ceil(max(h / s.cam_logits.shape[0], w / s.cam_logits.shape[1])))


def _peak_hit(prob: np.ndarray, truth: np.ndarray, cell_px: int) -> bool:
    """Pointing game: does the map's maximum fall on the defect, allowing one CAM cell of slack?

    The CAM is 16-32x coarser than the image, so a defect smaller than a cell cannot be outlined,
    but its cell can be pointed at. Both maps share the peak (min-max scaling is monotonic).
    """
    y, x = np.unravel_index(int(np.argmax(prob)), prob.shape)
    y0, x0 = max(0, y - cell_px), max(0, x - cell_px)
    return bool(truth[y0 : y + cell_px + 1, x0 : x + cell_px + 1].any())


def truth_mask(item, shape) -> np.ndarray:
    """The item's ground truth at image size (bool; all False for an ok image)."""
    if item.label == 0:
        return np.zeros(shape, bool)
    mask = cv2.imdecode(np.fromfile(str(item.mask), np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"{item.mask}: not a readable mask image")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 0


def evaluate(opts: EvalOptions) -> dict:
    """Score every image of the dataset; returns the report (also written under --report)."""
    model = load_model(resolve_model_path(str(opts.model)))
    data = datasets.scan(opts.dataset)
    thr = model.threshold if opts.threshold is None else opts.threshold
    try:
        rule = model.mask_rule if opts.mask_rule is None else MaskRule.parse(opts.mask_rule)
    except ValueError as exc:
        raise UsageError(f"--mask-rule: {exc}") from None
    samples: list[Sample] = []
    labels, scores = [], []
    items = ((it, read_rgb(it.path)) for it in data.items)
    for n, (item, image, pred) in enumerate(Predictor(model, opts.batch_size).stream(items), 1):
        labels.append(item.label)
        scores.append(pred.score)
        if data.has_masks and (item.label == 0 or item.mask is not None):
            samples.append(Sample(pred.cam_logits, pred.score, truth_mask(item, image.shape[:2])))
        if n % 25 == 0 or n == len(data.items):
            print(f"inspectd evaluate: {n}/{len(data.items)} images", file=sys.stderr, flush=True)
    labels_a, scores_a = np.array(labels), np.array(scores)
    image_report = image_metrics(labels_a, scores_a, thr)
    report = {
        "model": {
            "path": str(opts.model),
            "name": model.name,
            "sha256": model.sha256,
            "pooling": str(model.pooling),
            "mask_rule": str(model.mask_rule),
        },
        "dataset": str(opts.dataset),
        "n_images": len(labels),
        "counts": data.counts(),
        "image": image_report,
    }
    rocs: dict = {}
    if any(s.truth.any() for s in samples):
        print("inspectd evaluate: pixel metrics (AUPRO, regions, mask rules)", file=sys.stderr, flush=True)
        report["pixel"], rocs = _pixel_report(samples, rule, thr)
    if opts.report is not None:
        _write_report(opts.report, report, labels_a, scores_a, rocs)
    return report


def _write_report(out: Path, report: dict, labels: np.ndarray, scores: np.ndarray, rocs: dict) -> None:
    from inspectd.toolkit.plots import plot_roc_pr

    out.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    curves = {"image": (fpr, tpr, report["image"]["roc_auc"])}
    for name, (pfpr, ptpr) in rocs.items():
        curves[f"pixel, {name} map"] = (pfpr, ptpr, report["pixel"][name]["roc_auc"])
    precision, recall, _ = metrics.precision_recall_curve(labels, scores)
    plot_roc_pr(curves, (recall, precision, report["image"]["average_precision"]), out / "roc_pr.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))


def format_table(report: dict) -> str:
    """A human-readable summary for stdout."""
    im = report["image"]
    lines = [
        f"model {report['model']['name']}  dataset {report['dataset']}  images {report['n_images']} {report['counts']}",
        "",
        "image level           ROC-AUC    AP   thr   acc  prec   rec    F1",
    ]
    rows = [("at model threshold", im)] + ([("at best-F1 threshold", im["best_f1"])] if im.get("best_f1") else [])
    for label, m in rows:
        lines.append(
            f"{label:<20}  {im['roc_auc']:7.3f} {im['average_precision']:5.3f} {m['threshold']:5.2f} "
            f"{m['accuracy']:5.3f} {m['precision']:5.3f} {m['recall']:5.3f} {m['f1']:5.3f}"
        )
    if "pixel" in report:
        px = report["pixel"]
        pub = px["published"]

        def f(v):
            return "  n/a" if v is None else f"{v:5.3f}"

        lines += [
            "",
            f"what the daemon publishes (mask rule {pub['mask_rule']}, regions on images judged defective; "
            f"{px['n_defect_images']} defect images with masks)",
            f"  mean IoU {f(pub['iou'])}  Dice {f(pub['dice'])}  region recall {f(pub['region_recall'])}  "
            f"region precision {f(pub['region_precision'])}  ok images with a region {f(pub['false_region_rate'])}",
            f"  map peak on the defect (+- one CAM cell): {100 * px['peak_in_defect']:.1f} % of defect images",
            "",
            "maps (threshold-free)                  ROC-AUC  AUPRO | oracle: IoU  Dice at the best threshold",
        ]
        for name in MAPS:
            m = px[name]
            lines.append(
                f"{name + ' map':<38} {m['roc_auc']:7.3f} {m['aupro']:6.3f} |        {m['iou']:5.3f} "
                f"{m['dice']:5.3f} at {m['threshold']:5.3f}"
            )
        rules = ", ".join(f"{k}:{v['param']:g} -> {v['iou']:.3f}" for k, v in px["oracle_rules"].items())
        lines.append(f"oracle mask rules (parameter tuned on this data, indicative only): {rules}")
    return "\n".join(lines)
