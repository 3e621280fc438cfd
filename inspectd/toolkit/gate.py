"""The quality gate: a precision other than float32 is measured against float32 before anything runs it.

`inspectd export --precision P --runtime R` runs the model twice on a labelled validation set
(the training run's validation split by default: images the model was not trained on, and never
the calibration images), once at float32 and once at P, both with R and the daemon's own engine,
and compares what the line depends on:

- image ROC-AUC (how well scores rank defects above good parts),
- the verdicts: the share of images judged otherwise at the model's threshold,
- pixel ROC-AUC of the calibrated map (the mask's ranking; images with masks only),
- region IoU: the mean IoU of the published mask (the model's own rule, regions on images judged
  defective only) with the truth, over defect images with masks.

A drop beyond the tolerance (`Tolerance`, documented in docs/performance.md#precision; each
overridable) refuses the precision: the INT8 model is not kept, and the gate record says why.
Metrics come from scikit-learn and our tested IoU (inspectd.toolkit.scoring).
"""

from __future__ import annotations

__all__ = [
    "Tolerance",
    "Quality",
    "quality",
    "run_gate",
    "format_gate",
    "validation_set",
    "check_validation",
    "calibration_images",
]

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn import metrics

from inspectd.errors import DataError, UsageError
from inspectd.imageio import read_rgb
from inspectd.model.deployable import Deployable
from inspectd.pipeline.engine import Predictor, preprocess
from inspectd.toolkit import dataset as datasets
from inspectd.toolkit.evaluate import truth_mask
from inspectd.toolkit.localize import Sample, logit_map, published_mask
from inspectd.toolkit.scoring import iou_dice

PIXEL_SCALE = 4  # pixel ROC-AUC on maps and truths at 1/4 of the image size: the same ranking, 16x less memory
CALIBRATION_LIMIT = 300  # images; NNCF's default subset size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Tolerance:
    """The largest drops from float32 a precision may show (absolute, on the validation set)."""

    image_auc: float = 0.01
    pixel_auc: float = 0.01
    region_iou: float = 0.02
    verdict_change: float = 0.02  # the share of images whose verdict (score >= the model's threshold) changes


@dataclass(frozen=True)
class Quality:
    image_auc: float
    pixel_auc: float | None  # None: the validation set has no masks
    region_iou: float | None
    scores: tuple[float, ...]


def _training(deployable: Deployable) -> dict:
    training = deployable.meta.get("training") or {}
    if not training.get("dataset"):
        raise UsageError(f"model {deployable.name} does not record its training set: give --validation and --calibration")
    return training


def _training_split(deployable: Deployable) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) as `inspectd train` split them (the same seed and fraction), or its --val folder."""
    training = _training(deployable)
    root = Path(training["dataset"])
    if not root.is_dir():
        raise UsageError(f"the training set {root} of model {deployable.name} is not here: give --validation and --calibration")
    data = datasets.scan(root)
    if training.get("val"):
        return data, datasets.scan(Path(training["val"]))
    return datasets.stratified_split(data, float(training.get("val_fraction", 0.2)), int(training.get("seed", 0)))


MIN_PER_CLASS = 10  # validation images of each class: fewer cannot show an ROC-AUC drop of 0.01


def check_validation(data: datasets.Dataset, source: str) -> None:
    """DataError unless `data` has at least MIN_PER_CLASS ok and defect images."""
    counts = data.counts()
    if min(counts.get("ok", 0), counts.get("defect", 0)) < MIN_PER_CLASS:
        raise DataError(
            f"{source}: the quality gate needs at least {MIN_PER_CLASS} ok and {MIN_PER_CLASS} defect images, "
            f"found {counts.get('ok', 0)} and {counts.get('defect', 0)}"
        )


def validation_set(deployable: Deployable, folder: Path | None) -> datasets.Dataset:
    """The labelled images the gate measures on: `folder`, else the training run's validation split."""
    return datasets.scan(folder) if folder is not None else _training_split(deployable)[1]


def calibration_images(deployable: Deployable, folder: Path | None, limit: int = CALIBRATION_LIMIT) -> list[np.ndarray]:
    """Up to `limit` images as the runtimes take them (float32 [1, h, w, 3] RGB 0..255 at the model's input size):
    any images under `folder` (labelled or not), else the training split's. Spread evenly over the set."""
    if folder is not None:  # a dataset's masks are not images of parts
        found = Path(folder).rglob("*")
        paths = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and "masks" not in p.relative_to(folder).parts)
    else:
        paths = [item.path for item in _training_split(deployable)[0].items]
    if not paths:
        raise DataError(f"{folder}: no images to calibrate with")
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int)]
    w, h = deployable.input_size
    return [preprocess(read_rgb(p)[None], (h, w)).numpy() for p in picked]


def _pixels(logits: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = truth.shape
    size = (max(1, w // PIXEL_SCALE), max(1, h // PIXEL_SCALE))
    small = cv2.resize(logits.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    # a defect pixel of the small truth: any defect pixel under it (nearest-neighbour would lose thin scratches)
    return small.ravel(), (cv2.resize(truth.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0).ravel()


def quality(deployable: Deployable, data: datasets.Dataset, images: list[np.ndarray], **engine) -> Quality:
    """The three measures for the model run by InferenceEngine(**engine) (runtime, precision, cache_dir, ...)."""
    preds = Predictor(deployable, 8, gated=False, **engine).predict(images)
    labels = data.labels
    scores = np.array([p.score for p in preds])
    if not (np.isfinite(scores).all() and all(np.isfinite(p.cam_logits).all() for p in preds)):
        nan = math.nan if data.has_masks else None  # overflowed: nothing to measure, and the gate refuses a NaN
        return Quality(math.nan, nan, nan, tuple(scores.tolist()))
    image_auc = float(metrics.roc_auc_score(labels, scores))
    with_truth = [(it, im, p) for it, im, p in zip(data.items, images, preds) if it.label == 0 or it.mask is not None]
    if not data.has_masks or not any(it.label == 1 for it, _, _ in with_truth):
        return Quality(image_auc, None, None, tuple(scores.tolist()))
    flat_maps, flat_truth, ious = [], [], []
    for item, image, pred in with_truth:
        truth = truth_mask(item, image.shape[:2])
        logits = logit_map(pred.cam_logits, truth.shape[1], truth.shape[0])
        m, t = _pixels(logits, truth)
        flat_maps.append(m)
        flat_truth.append(t)
        if truth.any():
            published = published_mask(
                Sample(pred.cam_logits, pred.score, truth), deployable.mask_rule, deployable.threshold, logits
            )
            ious.append(iou_dice(published, truth)[0])
    pixel_auc = float(metrics.roc_auc_score(np.concatenate(flat_truth), np.concatenate(flat_maps)))
    return Quality(image_auc, pixel_auc, float(np.mean(ious)), tuple(scores.tolist()))


def _drops(ref: Quality, cand: Quality, tol: Tolerance, threshold: float) -> tuple[dict, list[str]]:
    """{measure: drop} and the measures beyond their tolerance. A measure that is not a number (NaN: one class
    only among the pixels, a model whose scores overflowed) fails: a gate passes only what it measured. The
    verdict change is the share of images judged otherwise at the model's threshold: ROC-AUC is blind to a
    shift of every score, the line's verdict is not."""
    drops: dict[str, float | None] = {}
    failed: list[str] = []
    for name in ("image_auc", "pixel_auc", "region_iou"):
        a, b = getattr(ref, name), getattr(cand, name)
        if a is None or b is None:
            continue
        drops[name] = round(a - b, 6) if math.isfinite(a - b) else None
        if not math.isfinite(a - b) or a - b > getattr(tol, name) + 1e-12:
            failed.append(name)
    ref_verdict, cand_verdict = np.array(ref.scores) >= threshold, np.array(cand.scores) >= threshold
    changed = round(float(np.mean(ref_verdict != cand_verdict)), 6)
    drops["verdict_change"] = changed
    if changed > tol.verdict_change + 1e-12 or not np.isfinite(cand.scores).all():
        failed.append("verdict_change")
    return drops, failed


def run_gate(
    deployable: Deployable,
    runtime: str,
    precision: str,
    data: datasets.Dataset,
    tolerance: Tolerance,
    cache_dir: Path | None,
    validation: str,
) -> dict:
    """Measure float32 and `precision` with `runtime` on `data`; the gate record (passed or not, with the table)."""
    check_validation(data, validation)
    print(f"inspectd export: quality gate on {len(data.items)} validation images ({validation})", file=sys.stderr, flush=True)
    images = [read_rgb(item.path) for item in data.items]
    t0 = time.monotonic()
    # TensorFlow's float16 needs the GPU, so the gate runs where the daemon would; the others run on the CPU.
    device = "auto" if runtime == "tensorflow" else "cpu"
    engine = {"runtime": runtime, "cache_dir": cache_dir, "device": device}
    ref = quality(deployable, data, images, precision="float32", **engine)
    cand = quality(deployable, data, images, precision=precision, **engine)
    drops, failed = _drops(ref, cand, tolerance, deployable.threshold)
    finite = np.isfinite(ref.scores).all() and np.isfinite(cand.scores).all()
    spread = min(np.std(ref.scores), np.std(cand.scores)) if finite else 0.0  # a constant score: no correlation
    corr = float(np.corrcoef(ref.scores, cand.scores)[0, 1]) if spread > 0 else None

    def shown(name: str) -> str:
        return "not a number" if drops[name] is None else f"{drops[name]:+.4f}"

    if failed:
        why = "drop beyond tolerance: " + ", ".join(f"{n} {shown(n)} > {getattr(tolerance, n)}" for n in failed)
    else:
        why = "within tolerance: " + ", ".join(f"{n} {shown(n)}" for n in drops)
    if ref.pixel_auc is None:
        why += " (no masks in the validation set: image ROC-AUC only)"
    return {
        "sha256": deployable.sha256,
        "name": deployable.name,
        "runtime": runtime,
        "precision": precision,
        "passed": not failed,
        "why": why,
        "tolerance": asdict(tolerance),
        "float32": {k: v for k, v in asdict(ref).items() if k != "scores"},
        precision: {k: v for k, v in asdict(cand).items() if k != "scores"},
        "drop": drops,
        "score_correlation": None if corr is None else round(corr, 6),
        "max_score_difference": float(np.max(np.abs(np.array(ref.scores) - np.array(cand.scores)))) if finite else None,
        "threshold": deployable.threshold,
        "device": device,
        "validation": {"source": validation, "images": len(data.items), "counts": data.counts()},
        "seconds": round(time.monotonic() - t0, 1),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_gate(record: dict) -> str:
    """The gate as a table: each measure at float32 and at the precision, the drop and its tolerance."""
    p = record["precision"]
    ref, cand, tol = record["float32"], record[p], record["tolerance"]
    lines = [
        f"quality gate: {record['name']} with {record['runtime']}, {p} vs float32 "
        f"on {record['validation']['images']} images ({record['validation']['source']})",
        f"  {'measure':<12} {'float32':>8} {p:>8} {'drop':>8} {'allowed':>8}",
    ]
    for name in ("image_auc", "pixel_auc", "region_iou"):
        if ref[name] is None:
            lines.append(f"  {name:<12} {'n/a':>8} {'n/a':>8}   (no masks)")
            continue
        drop = ref[name] - cand[name]
        lines.append(f"  {name:<12} {ref[name]:8.4f} {cand[name]:8.4f} {drop:+8.4f} {tol[name]:8.3f}")
    change = record["drop"]["verdict_change"]
    lines.append(
        f"  {'verdicts':<12} {'':>8} {'':>8} {change:8.2%} {tol['verdict_change']:8.2%}  changed at threshold "
        f"{record['threshold']:.3f}"
    )
    corr, diff = record["score_correlation"], record["max_score_difference"]
    corr_text = "n/a (a constant score)" if corr is None else f"{corr:.4f}"
    diff_text = "not a number" if diff is None else f"{diff:.4f}"
    lines.append(f"  score correlation {corr_text}, largest score difference {diff_text}")
    lines.append(f"  {'PASSED' if record['passed'] else 'REFUSED'}: {record['why']}")
    return "\n".join(lines)
