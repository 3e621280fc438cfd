#!/usr/bin/env python
"""How tight the demo model's regions are, before and after (not run in CI).

    .venv/bin/python benchmarks/demo_masks.py --old OLD.keras [--new builtin:demo] [--out runs/demo-masks]
        [--picture docs/img/demo-before-after.png]

Renders 100 held-out synthetic 320x240 frames (`inspectd synth --seed 12`, the frames the example
config's synthetic cameras draw; the demo model trained on seed 11), runs `inspectd infer` with each
model and reports, over the frames each model judges defective: the median share of the frame that
the union of the region boxes covers, the median share of the frame in regions, and the truth's
share, plus `inspectd evaluate`'s mean defect IoU at the model's own mask rule. The picture shows
four defect frames: the old model's overlay above, the new one's below, the true defect outlined
in green.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def inspectd(*args) -> None:
    subprocess.run([sys.executable, "-m", "inspectd", *map(str, args)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def coverage(results: Path, size: tuple[int, int]) -> dict:
    """Median box cover and region share over the frames judged defective."""
    w, h = size
    boxes, regions, n = [], [], 0
    for line in results.read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("is_defect"):
            continue
        n += 1
        canvas = np.zeros((h, w), bool)
        for x, y, bw, bh in (r["bbox"] for r in rec["regions"]):
            canvas[y : y + bh, x : x + bw] = True
        boxes.append(canvas.mean())
        regions.append(sum(r["area_px"] for r in rec["regions"]) / (w * h))
    return {"defect_frames": n, "median_box_cover": float(np.median(boxes)), "median_region_share": float(np.median(regions))}


def outlined(overlay_png: Path, truth_png: Path) -> np.ndarray:
    image = cv2.imread(str(overlay_png))
    truth = cv2.imread(str(truth_png), cv2.IMREAD_GRAYSCALE)
    contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, (0, 255, 0), 1)
    return image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--old", required=True, help="the model before (e.g. git show REV:inspectd/assets/demo.keras > old.keras)")
    ap.add_argument("--new", default="builtin:demo")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-masks")
    ap.add_argument("--picture", type=Path, default=ROOT / "docs" / "img" / "demo-before-after.png")
    ap.add_argument("--show", type=int, default=4, help="defect frames in the picture")
    args = ap.parse_args()
    data = args.out / "test"
    if not (data / "synth.json").exists():
        inspectd("synth", data, "--n", 100, "--size", "320x240", "--seed", 12)
    truth_share = float(
        np.median([(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0).mean() for p in sorted((data / "masks").glob("*.png"))])
    )
    res, rows = {"truth_median_share": truth_share}, []
    names = sorted(p.stem for p in (data / "defect").iterdir())[: args.show]
    for tag, model in (("before", args.old), ("after", args.new)):
        out = args.out / tag
        inspectd("infer", model, data / "defect", data / "ok", "--out", out)
        inspectd("evaluate", model, data, "--report", out / "report")
        report = json.loads((out / "report" / "report.json").read_text())
        res[tag] = {
            "model": str(model),
            "mask_rule": report["model"]["mask_rule"],
            "image_roc_auc": report["image"]["roc_auc"],
            "mean_defect_iou": report["pixel"]["published"]["iou"],
            "region_recall": report["pixel"]["published"]["region_recall"],
            "region_precision": report["pixel"]["published"]["region_precision"],
            "false_region_rate": report["pixel"]["published"]["false_region_rate"],
            **coverage(out / "results.jsonl", (320, 240)),
        }
        rows.append(np.hstack([outlined(out / f"{n}_overlay.png", data / "masks" / f"{n}.png") for n in names]))
    args.picture.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.picture), np.vstack(rows))
    (args.out / "summary.json").write_text(json.dumps(res, indent=2))
    print(f"command: {' '.join(sys.argv)}")
    print(f"true defects: median {100 * truth_share:.2f} % of a frame")

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    for tag in ("before", "after"):
        r = res[tag]
        print(
            f"{tag:6}: {r['model']} ({r['mask_rule']}): image ROC-AUC {r['image_roc_auc']:.3f}, mean defect IoU "
            f"{r['mean_defect_iou']:.3f}, region recall {f(r['region_recall'])} precision {f(r['region_precision'])}, "
            f"ok frames with a region {f(r['false_region_rate'])}; over {r['defect_frames']} frames judged defective: "
            f"boxes cover a median {100 * r['median_box_cover']:.1f} %, regions {100 * r['median_region_share']:.1f} %"
        )
    print(f"picture: {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
