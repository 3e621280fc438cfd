"""`inspectd evaluate`: image-level and (with masks) pixel-level quality, calibrated vs min-max map.

Metrics: ROC-AUC, average precision, ROC/PR curves and the threshold metrics come from
scikit-learn; IoU/Dice (inspectd.model.scoring.iou_dice) are our own, unit-tested code.
"""

from __future__ import annotations

__all__ = ["EvalOptions", "evaluate", "format_table"]

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from sklearn import metrics

from inspectd.errors import DataError
from inspectd.imageio import read_rgb
from inspectd.model import dataset as datasets
from inspectd.model.deployable import load_model
from inspectd.model.scoring import image_metrics, iou_dice, minmax_map
from inspectd.pipeline.engine import Predictor
from inspectd.pipeline.postprocess import upsample

# The same threshold search for both maps: a grid over (0, 1), the best mean IoU over defect images.
# The grid reaches 0.999 because calibrated maps of confidently defective images sit high everywhere.
THRESHOLDS = np.round(np.concatenate([np.arange(0.02, 0.99, 0.02), [0.99, 0.995, 0.999]]), 3)
MAPS = ("calibrated", "minmax")


@dataclass(frozen=True)
class EvalOptions:
    model: Path
    dataset: Path
    report: Path | None = None
    batch_size: int = 8
    threshold: float | None = None  # image-level; None = the model's own


@dataclass
class _Pixels:
    """Accumulates per-pixel scores for AUC and per-image IoU/Dice over the threshold grid."""

    scores: dict = field(default_factory=lambda: {m: [] for m in MAPS})
    truth: list = field(default_factory=list)
    iou: dict = field(default_factory=lambda: {m: [] for m in MAPS})
    dice: dict = field(default_factory=lambda: {m: [] for m in MAPS})
    peak_hits: list = field(default_factory=list)
    n_defect: int = 0

    def add(self, maps: dict[str, np.ndarray], truth: np.ndarray, cell_px: int) -> None:
        self.truth.append(truth.ravel())
        for name, prob in maps.items():
            self.scores[name].append(prob.ravel())
        if truth.any():
            self.n_defect += 1
            self.peak_hits.append(_peak_hit(maps["calibrated"], truth, cell_px))
            for name, prob in maps.items():
                pairs = [iou_dice(prob >= t, truth) for t in THRESHOLDS]
                self.iou[name].append([p[0] for p in pairs])
                self.dice[name].append([p[1] for p in pairs])

    def summary(self, model_mask_threshold: float) -> tuple[dict, dict]:
        """(report block, {map: (fpr, tpr)} for the ROC plot)."""
        truth = np.concatenate(self.truth)
        out: dict = {"n_defect_images": self.n_defect, "n_pixels": int(truth.size),
                     "peak_in_defect": float(np.mean(self.peak_hits))}
        rocs = {}
        for name in MAPS:
            scores = np.concatenate(self.scores[name])
            iou, dice = np.mean(self.iou[name], axis=0), np.mean(self.dice[name], axis=0)
            best = int(np.argmax(iou))
            out[name] = {"roc_auc": float(metrics.roc_auc_score(truth, scores)), "iou": float(iou[best]),
                         "dice": float(dice[best]), "threshold": float(THRESHOLDS[best])}
            rocs[name] = metrics.roc_curve(truth, scores)[:2]
        at = np.argmin(np.abs(THRESHOLDS - model_mask_threshold))
        out["calibrated"]["at_model_threshold"] = {
            "threshold": float(THRESHOLDS[at]),
            "iou": float(np.mean(self.iou["calibrated"], axis=0)[at]),
            "dice": float(np.mean(self.dice["calibrated"], axis=0)[at]),
        }
        return out, rocs


def _peak_hit(prob: np.ndarray, truth: np.ndarray, cell_px: int) -> bool:
    """Pointing game: does the map's maximum fall on the defect, allowing one CAM cell of slack?

    The CAM is 16-32x coarser than the image, so a defect smaller than a cell cannot be outlined,
    but its cell can be pointed at. Both maps share the peak (min-max scaling is monotonic).
    """
    y, x = np.unravel_index(int(np.argmax(prob)), prob.shape)
    y0, x0 = max(0, y - cell_px), max(0, x - cell_px)
    return bool(truth[y0:y + cell_px + 1, x0:x + cell_px + 1].any())


def _truth(item, shape) -> np.ndarray:
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
    model = load_model(opts.model)
    data = datasets.scan(opts.dataset)
    thr = model.threshold if opts.threshold is None else opts.threshold
    pixels = _Pixels() if data.has_masks else None
    labels, scores = [], []
    items = ((it, read_rgb(it.path)) for it in data.items)
    for n, (item, image, pred) in enumerate(Predictor(model, opts.batch_size).stream(items), 1):
        labels.append(item.label)
        scores.append(pred.score)
        if pixels is not None and (item.label == 0 or item.mask is not None):
            h, w = image.shape[:2]
            # float64: in float32 sigmoid saturates to exactly 1.0 above a logit of ~17, and the
            # ties would distort the pixel ROC of confidently defective images.
            maps = {"calibrated": upsample(1.0 / (1.0 + np.exp(-pred.cam_logits.astype(np.float64))), w, h),
                    "minmax": upsample(minmax_map(pred.cam_logits, pred.score), w, h)}
            cell_px = int(np.ceil(max(h / pred.cam_logits.shape[0], w / pred.cam_logits.shape[1])))
            pixels.add(maps, _truth(item, (h, w)), cell_px)
        if n % 25 == 0 or n == len(data.items):
            print(f"inspectd evaluate: {n}/{len(data.items)} images", file=sys.stderr, flush=True)
    labels_a, scores_a = np.array(labels), np.array(scores)
    image = image_metrics(labels_a, scores_a, thr)
    report = {"model": {"path": str(opts.model), "name": model.name, "sha256": model.sha256},
              "dataset": str(opts.dataset), "n_images": len(labels), "counts": data.counts(), "image": image}
    rocs: dict = {}
    if pixels is not None and pixels.n_defect:
        report["pixel"], rocs = pixels.summary(model.mask_threshold)
    if opts.report is not None:
        _write_report(opts.report, report, labels_a, scores_a, rocs)
    return report


def _write_report(out: Path, report: dict, labels: np.ndarray, scores: np.ndarray, rocs: dict) -> None:
    from inspectd.model.plots import plot_roc_pr

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
    lines = [f"model {report['model']['name']}  dataset {report['dataset']}  images {report['n_images']} {report['counts']}",
             "", "image level           ROC-AUC    AP   thr   acc  prec   rec    F1"]
    rows = [("at model threshold", im)] + ([("at best-F1 threshold", im["best_f1"])] if im.get("best_f1") else [])
    for label, m in rows:
        lines.append(f"{label:<20}  {im['roc_auc']:7.3f} {im['average_precision']:5.3f} {m['threshold']:5.2f} "
                     f"{m['accuracy']:5.3f} {m['precision']:5.3f} {m['recall']:5.3f} {m['f1']:5.3f}")
    if "pixel" in report:
        px = report["pixel"]
        lines += ["", f"pixel level ({px['n_defect_images']} defect images with masks)  ROC-AUC   IoU  Dice  thr (best mean IoU)"]
        for name in MAPS:
            m = px[name]
            lines.append(f"{name + ' map':<38} {m['roc_auc']:7.3f} {m['iou']:5.3f} {m['dice']:5.3f} {m['threshold']:5.3f}")
        at = px["calibrated"]["at_model_threshold"]
        label = "calibrated at model mask threshold"
        lines.append(f"{label:<38} {'':7} {at['iou']:5.3f} {at['dice']:5.3f} {at['threshold']:4.2f}")
        lines.append(f"map peak on the defect (+- one CAM cell): {100 * px['peak_in_defect']:.1f} % of defect images")
    return "\n".join(lines)
