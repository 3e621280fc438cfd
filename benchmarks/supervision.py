#!/usr/bin/env python
"""Mask supervision ablation (not run in CI): how many pixel masks a model needs, and which recipe.

    .venv/bin/python benchmarks/supervision.py --tiles DIR [--out runs/supervision] [--masks 0 5 10 20 all]
        [--recipes default ...] [--epochs 12] [--size 256x256] [--holdout] [--only-holdout]

For each number of masks k and each recipe: the training split keeps the masks of k of its defect images
(the same images for every recipe; the 5 are among the 10, the 10 among the 20), `inspectd train`
runs on it (its own 20 % validation split picks the epoch and the mask rule's parameter, from whatever
masks landed there: k = 0 gives the rule's default), and `inspectd evaluate` measures the held-out
test split: image ROC-AUC, pixel ROC-AUC, AUPRO, mean defect IoU at the model's own rule, region
recall / precision, ok images with a region, the best minmax IoU (an oracle on the test split, the
map's quality independent of the rule's parameter), training minutes.

Splits: the magnetic tiles' stratified 25 % test split (seed 0, as benchmarks/quality.py and
localization.py: never used for training, model selection or a rule's parameter); with --holdout
also a defect type held out of training (train on blowholes + ok, test on cracks + other ok tiles).
A model that exists is not trained again (delete its folder to retrain). Results: OUT/summary.json
and OUT/summary.md, rewritten after every run from every run evaluated under OUT so far. The dataset is the public Magnetic Tile
surface-defect dataset (Huang, Qiu, Yuan 2018) laid out as ok/ defect/ masks/ (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from localization import run, split_by_type  # benchmarks/ is the script's own folder
from quality import split_tiles

ROOT = Path(__file__).resolve().parents[1]

# name -> extra `inspectd train` arguments (on top of train's defaults, --epochs and --input-size). With masks,
# train's default is the centred pixel head at weight 0.25, the balanced loss at 1/4 of the input and ok images as
# background.
RECIPES = {
    "default": [],
    "labels-only": ["--pixel-weight", "0"],  # masks only pick the rule's parameter, as before mask supervision
    "raw": ["--pixel-head", "raw", "--pixel-weight", "1"],  # the pixel loss on the map itself
    "affine": ["--pixel-head", "affine", "--pixel-weight", "1"],
    "centred": ["--pixel-head", "centred", "--pixel-weight", "1"],  # train's default head at weight 1
    "plain": ["--pixel-loss", "plain"],
    "map-resolution": ["--pixel-resolution", "16"],  # the loss on the map's own grid
    "stride-8": ["--stride", "8"],  # atrous Lite0: a 2x finer map for the masks to shape
    "no-ok-negatives": ["--no-ok-negatives"],
    "weight-0.25": ["--pixel-weight", "0.25"],  # train's default with masks, named
    "bce": ["--loss", "bce"],
    "last-epoch": ["--select", "last"],
    "no-augment": ["--no-augment"],
    # Lite0's stages at stride 4 and a hidden layer (train's head defaults: lse:5 pooling, raw pixel head at weight 1,
    # probability mask rule)
    "hypercolumn": ["--head", "hypercolumn"],
    "hypercolumn-max": ["--head", "hypercolumn", "--pooling", "max"],
    "hypercolumn-gap": ["--head", "hypercolumn", "--pooling", "gap", "--pixel-head", "centred"],
    "hypercolumn-share": ["--head", "hypercolumn", "--mask-share", "0.25"],  # the masked images a quarter of each batch
}
# Runs of an earlier version of a recipe, kept under their own name: their rows say what they were.
RENAMED = {"affine-b0": "affine, b starting at 0"}
SPLITS = {"tiles": "tiles 25 % test split", "holdout": "held-out type: train blowhole, test crack"}


def with_masks(train_dir: Path, out: Path, keep: int | None, seed: int = 0) -> Path:
    """`train_dir`'s images (symlinks) with the masks of `keep` of its defect images (None: all), chosen once by
    `seed`: the first `keep` of one permutation, so smaller sets are inside larger ones."""
    if out.exists():
        return out
    for sub in ("ok", "defect", "masks"):
        (out / sub).mkdir(parents=True)
    for sub in ("ok", "defect"):
        for f in sorted((train_dir / sub).iterdir()):
            (out / sub / f.name).symlink_to(f.resolve())
    masks = sorted((train_dir / "masks").iterdir())
    order = np.random.default_rng(seed).permutation(len(masks))
    for i in order[: len(masks) if keep is None else keep]:
        (out / "masks" / masks[i].name).symlink_to(masks[i].resolve())
    return out


def one(recipe: str, keep: int | None, train_dir: Path, test_dir: Path, out: Path, args) -> None:
    """Train (unless the model exists) and evaluate one recipe with `keep` masks; the report lands in its folder."""
    name = recipe + (f"_seed{args.seed}" if args.seed else "") + f"-{'all' if keep is None else keep}"
    folder = out / name
    model = folder / f"{name}.keras"
    data = with_masks(train_dir, out / "data" / f"masks-{'all' if keep is None else keep}", keep)
    if not model.exists():
        fixed = ["--epochs", args.epochs, "--input-size", args.size, "--seed", args.seed]
        seconds = run("train", data, "--out", model, *fixed, *RECIPES[recipe])
        (folder / "train_seconds.txt").write_text(f"{seconds:.0f}\n")
    run("evaluate", model, test_dir, "--report", folder / "report")


def collect(out: Path) -> dict:
    """Every evaluated run under OUT/tiles and OUT/holdout: {split title: [row, ...]}, by recipe, then masks."""
    results: dict = {}
    for sub, title in SPLITS.items():
        rows = []
        for report in sorted((out / sub).glob("*/report/report.json")):
            folder = report.parents[1]
            recipe, _, masks = folder.name.rpartition("-")
            recipe, _, seed = recipe.partition("_seed")
            seconds = folder / "train_seconds.txt"
            data = out / sub / "data" / f"masks-{masks}" / "masks"
            rows.append(
                {
                    "recipe": RENAMED.get(recipe, recipe),
                    "seed": int(seed or 0),
                    "masks": masks,
                    "masks_in_training": len(list(data.iterdir())) if data.is_dir() else None,
                    "train_minutes": round(float(seconds.read_text()) / 60, 1) if seconds.exists() else None,
                    "report": json.loads(report.read_text()),
                }
            )
        order = list(RECIPES) + list(RENAMED.values())
        rows.sort(key=lambda r: (order.index(r["recipe"]) if r["recipe"] in order else 99, _count(r["masks"]), r["seed"]))
        if rows:
            results[title] = rows
    return results


def _count(masks: str) -> float:
    return float("inf") if masks == "all" else float(masks)


def _row(r: dict) -> str:
    rep = r["report"]
    img, pix = rep.get("image", {}), rep.get("pixel") or {}
    pub, cal = pix.get("published", {}), pix.get("calibrated", {})
    oracle = (pix.get("oracle_rules") or {}).get("minmax", {})

    def f(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    seed = f" (seed {r['seed']})" if r["seed"] else ""
    return (
        f"| {r['recipe']}{seed} | {r['masks']} | {f(img.get('roc_auc'))} | {f(cal.get('roc_auc'))} | {f(cal.get('aupro'))} | "
        f"{f(pub.get('iou'))} ({pub.get('mask_rule')}) | {f(pub.get('region_recall'))} | {f(pub.get('region_precision'))} | "
        f"{f(pub.get('false_region_rate'))} | {f(oracle.get('iou'))} | "
        f"{'-' if r['train_minutes'] is None else format(r['train_minutes'], '.1f')} |"
    )


def write_summary(results: dict, out: Path) -> str:
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    header = (
        "| recipe | masks | image ROC-AUC | pixel ROC-AUC | AUPRO | IoU at the model's rule | region recall | "
        "region precision | ok images with a region | best minmax IoU (oracle) | train min |\n|" + "---|" * 11
    )
    md = [f"Every run under {out} (the last command: `{' '.join(sys.argv)}`)\n"]
    for title, rows in results.items():
        md += [f"### {title}\n", header, *map(_row, rows), ""]
    (out / "summary.md").write_text("\n".join(md))
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiles", type=Path, required=True, help="Magnetic Tile dataset folder: ok/ defect/ masks/")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "supervision")
    ap.add_argument("--masks", nargs="+", default=["0", "5", "10", "20", "all"], help="numbers of masks (or all)")
    ap.add_argument("--recipes", nargs="+", default=["default"], choices=sorted(RECIPES))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", default="256x256", help="training input WxH")
    ap.add_argument("--seed", type=int, default=0, help="train's seed (split, sampling, weights), not the masks'")
    ap.add_argument("--holdout", action="store_true", help="also train on blowholes, test on cracks")
    ap.add_argument("--only-holdout", action="store_true", help="only the held-out defect type")
    args = ap.parse_args()
    counts = [None if m == "all" else int(m) for m in args.masks]
    splits = {}
    if not args.only_holdout:
        splits["tiles 25 % test split"] = (split_tiles(args.tiles, args.out / "split", 0.25, 0), args.out / "tiles")
    if args.holdout or args.only_holdout:
        splits["held-out type: train blowhole, test crack"] = (
            split_by_type(args.tiles, args.out / "split-type", "blowhole", "crack"),
            args.out / "holdout",
        )
    t0 = time.monotonic()
    for (train_dir, test_dir), sub in splits.values():
        for recipe in args.recipes:
            for keep in counts:
                one(recipe, keep, train_dir, test_dir, sub, args)
                write_summary(collect(args.out), args.out)  # after every run: hours of work survive an interruption
                print(f"supervision: {sub.name} {recipe} {keep} done after {(time.monotonic() - t0) / 60:.0f} min", flush=True)
    print(write_summary(collect(args.out), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
