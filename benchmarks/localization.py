#!/usr/bin/env python
"""Localization ablation (not run in CI): which head pooling, stride and recipe give tight masks.

    .venv/bin/python benchmarks/localization.py --tiles DIR [--out runs/localization] [--epochs 20]
        [--only gap lse5 ...] [--holdout]

For each configuration: `inspectd train` on the magnetic-tile train split, `inspectd evaluate` on the
held-out test split (the same stratified 25 % split as benchmarks/quality.py, seed 0: never used
for training, model selection or the mask rule's parameter). A model that exists is not trained
again (delete it to retrain); evaluation always runs. With --holdout each configuration is also
trained on one defect type (blowholes + ok) and tested on the other (cracks + ok): a recipe that
only works on the type it was tuned on shows here. Results: OUT/summary.json and OUT/summary.md
(a table per split: image ROC-AUC, pixel ROC-AUC, AUPRO, IoU at the model's own mask rule, region
recall/precision, false-region rate on ok images, pointing game, training minutes).
The dataset is the public Magnetic Tile surface-defect dataset (Huang, Qiu, Yuan 2018) laid out as
ok/ defect/ masks/ (see docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from quality import split_tiles  # benchmarks/ is the script's own folder

ROOT = Path(__file__).resolve().parents[1]

# name -> extra `inspectd train` arguments
_PAPER = ["--backbone", "efficientnetv2b0", "--stride", "16"]  # from scratch (--weights none), the paper's network
CONFIGS = {
    "gap": [*_PAPER, "--pooling", "gap"],
    "lse5": [*_PAPER, "--pooling", "lse:5"],
    "lse2": [*_PAPER, "--pooling", "lse:2"],
    "topk10": [*_PAPER, "--pooling", "topk:0.1"],
    "topk25": [*_PAPER, "--pooling", "topk:0.25"],
    "max": [*_PAPER, "--pooling", "max"],
    # ImageNet features offline: EfficientNet-Lite0 with the weights of the `pretrained` extra
    "lite0_gap": ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--pooling", "gap"],
    "lite0_lse5": ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--pooling", "lse:5"],
    "lite0_topk10": ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--pooling", "topk:0.1"],
    # the same at stride 8 (atrous Lite0): a 32x32 map at 256x256
    "lite0_gap_s8": [
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "imagenet",
        "--pooling",
        "gap",
        "--stride",
        "8",
        "--mask-rule",
        "minmax",
    ],
}


def run(*args) -> float:
    """`inspectd ARGS` in a subprocess; seconds taken; stops on failure."""
    print("$ inspectd", " ".join(map(str, args)), flush=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "inspectd", *map(str, args)], check=True, cwd=ROOT)
    return time.monotonic() - t0


def split_by_type(src: Path, out: Path, train_type: str, test_type: str, seed: int = 0) -> tuple[Path, Path]:
    """Train on `train_type` defects, test on `test_type`; ok images split 75/25 (symlinks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for part in ("train", "test"):
        for sub in ("ok", "defect", "masks"):
            (out / part / sub).mkdir(parents=True, exist_ok=True)
    oks = sorted((src / "ok").iterdir())
    test_ok = set(rng.permutation(len(oks))[: round(0.25 * len(oks))].tolist())
    links = [(f, out / ("test" if i in test_ok else "train") / "ok" / f.name) for i, f in enumerate(oks)]
    for f in sorted((src / "defect").iterdir()):
        part = "train" if f.name.startswith(train_type) else "test" if f.name.startswith(test_type) else None
        if part:
            links.append((f, out / part / "defect" / f.name))
            mask = src / "masks" / f"{f.stem}.png"
            if mask.exists():
                links.append((mask, out / part / "masks" / mask.name))
    for target, link in links:
        if not link.exists():
            link.symlink_to(target.resolve())
    return out / "train", out / "test"


def one(name: str, train_dir: Path, test_dir: Path, out: Path, args) -> dict:
    model = out / name / f"{name}.keras"
    seconds = None
    if not model.exists():
        seconds = run(
            "train",
            train_dir,
            "--out",
            model,
            "--weights",
            args.weights,
            "--epochs",
            args.epochs,
            "--batch-size",
            8,
            "--input-size",
            args.size,
            "--seed",
            0,
            *CONFIGS[name],
        )
        (out / name / "train_seconds.txt").write_text(f"{seconds:.0f}\n")
    elif (out / name / "train_seconds.txt").exists():
        seconds = float((out / name / "train_seconds.txt").read_text())
    run("evaluate", model, test_dir, "--report", out / name / "report")
    report = json.loads((out / name / "report" / "report.json").read_text())
    rules = rule_ablation(model, train_dir, test_dir)
    return {"name": name, "train_minutes": None if seconds is None else round(seconds / 60, 1), "report": report, "rules": rules}


def _samples(model, items):
    from inspectd.imageio import read_rgb
    from inspectd.pipeline.engine import Predictor
    from inspectd.toolkit.evaluate import truth_mask
    from inspectd.toolkit.localize import Sample

    items = [it for it in items if it.label == 0 or it.mask is not None]
    images = [read_rgb(it.path) for it in items]
    return [
        Sample(p.cam_logits, p.score, truth_mask(it, im.shape[:2]))
        for it, im, p in zip(items, images, Predictor(model, 8).predict(images))
    ]


def rule_ablation(model_path: Path, train_dir: Path, test_dir: Path) -> dict:
    """Each mask rule with its parameter picked on train's own validation split (as `train` does), measured on
    the test split: mean defect IoU of the published mask and the region metrics."""
    import numpy as np

    from inspectd.model.deployable import load_model
    from inspectd.toolkit import dataset as datasets
    from inspectd.toolkit.localize import RULE_GRIDS, logit_map, mean_defect_iou, pick_mask_rule, published_mask
    from inspectd.toolkit.scoring import region_metrics

    model = load_model(model_path)
    _, val_ds = datasets.stratified_split(datasets.scan(train_dir), 0.2, 0)  # exactly train's split (seed 0)
    val, test = _samples(model, val_ds.items), _samples(model, datasets.scan(test_dir).items)
    thr = model.threshold
    logits = [logit_map(s.cam_logits, s.truth.shape[1], s.truth.shape[0]) for s in test]  # upsampled once
    val_cache: dict = {}
    out = {}
    for kind in RULE_GRIDS:
        rule, curve = pick_mask_rule(val, kind, thr, val_cache)
        masks = [published_mask(s, rule, thr, lg) for s, lg in zip(test, logits)]
        regions = region_metrics(masks, [s.truth for s in test])
        out[kind] = {
            "rule": str(rule),
            "val_iou": curve[rule.param],
            "test_iou": mean_defect_iou(test, rule, thr, dict(enumerate(logits))),
            **{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in regions.items()},
        }
    return out


def _row(r: dict) -> str:
    rep = r["report"]
    img, pix = rep.get("image", {}), rep.get("pixel") or {}
    own = pix.get("published") or pix.get("calibrated", {})

    def f(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    return (
        f"| {r['name']} | {f(img.get('roc_auc'))} | {f(own.get('roc_auc'))} | {f(own.get('aupro'))} | "
        f"{f(own.get('iou_at_model_threshold', own.get('iou')))} | {f(own.get('region_recall'))} | "
        f"{f(own.get('region_precision'))} | {f(own.get('false_region_rate'))} | {f(pix.get('peak_on_defect'))} | "
        f"{f(r['train_minutes'])} |"
    )


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiles", type=Path, required=True, help="Magnetic Tile dataset folder: ok/ defect/ masks/")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "localization")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--size", default="256x256", help="training input WxH")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run (default: all)")
    ap.add_argument("--holdout", action="store_true", help="also train on blowholes, test on cracks")
    args = ap.parse_args()
    names = args.only or list(CONFIGS)
    splits = {"tiles 25 % test split": split_tiles(args.tiles, args.out / "split", 0.25, 0)}
    if args.holdout:
        splits["held-out type: train blowhole, test crack"] = split_by_type(
            args.tiles, args.out / "split-type", "blowhole", "crack"
        )
    results: dict = {}
    for title, (train_dir, test_dir) in splits.items():
        sub = args.out / ("tiles" if title.startswith("tiles") else "holdout")
        results[title] = []
        for name in names:
            results[title].append(one(name, train_dir, test_dir, sub, args))
            write_summary(results, args.out)  # after every configuration: hours of work survive an interruption
    print(write_summary(results, args.out))
    return 0


def write_summary(results: dict, out: Path) -> str:
    """OUT/summary.json and OUT/summary.md of the results so far; returns the Markdown."""
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    header = (
        "| config | image ROC-AUC | pixel ROC-AUC | AUPRO | IoU (own rule) | region recall | region precision | "
        "false-region rate (ok) | peak on defect | train min |\n|" + "---|" * 10
    )
    md = [f"Command: `{' '.join(sys.argv)}`\n"]
    for title, rows in results.items():
        md += [f"### {title}\n", header, *map(_row, rows), ""]
        md += [
            f"Mask rules ({title}): parameter picked on train's validation masks, measured on the test split "
            "(mean defect IoU / region recall / region precision / ok images with a region)\n",
            "| config | " + " | ".join(rows[0]["rules"]) + " |",
            "|---|" + "---|" * len(rows[0]["rules"]),
        ]
        for r in rows:
            cells = [
                f"{v['rule']}: {v['test_iou']:.3f} / {_f(v['region_recall'])} / {_f(v['region_precision'])} / "
                f"{_f(v['false_region_rate'])}"
                for v in r["rules"].values()
            ]
            md.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        md.append("")
    (out / "summary.md").write_text("\n".join(md))
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
