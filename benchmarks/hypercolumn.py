#!/usr/bin/env python
"""Which head could outline a defect: pixel-supervised probes on frozen Lite0 features (not run in CI).

    .venv/bin/python benchmarks/hypercolumn.py --tiles DIR [--out runs/okonly] [--size 256]

The supervised model's map is a 1x1 convolution (a linear head) on the stride-16 features, fine-tuned with
its backbone; with every training mask its IoU on the tiles' test split stays near 0.2
(docs/quality.md#mask-supervision). This asks what the head itself allows, with the backbone frozen
(ImageNet Lite0, the features benchmarks/okonly.py caches): a per-pixel head trained on the training
split's masks (ok images as all-background), at the stride-16, 8 or 4 grid (finer stages
average-pooled, coarser ones upsampled bilinearly: a hypercolumn), linear or with one hidden layer of
64 (two 1x1 convolutions: the same one-pass contract, cam_logits from the last). Balanced binary
cross-entropy (as train's), Adam 1e-3, 3000 steps of 1024 cells drawn from every cell with some defect and
a random 10 % of the rest (seed 0).
Measured on the test split, never used for a choice: mean IoU over defect images with the map cut at
logit 0 (no rule, no parameter), pixel ROC-AUC (2 M pixels sampled), image ROC-AUC of the map's maximum.
With `k` masks only k of the training split's defect images (drawn with seed 0) give pixel targets; the
other defect images are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from okonly import features, stacked  # benchmarks/ is the script's own folder
from quality import split_tiles

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3000  # Adam steps of 1024 cells per probe
ALL = ("block2b_add", "block3b_add", "block4c_add", "block5c_add", "block6d_add")
PROBES = {  # name -> (stages, grid stride, hidden units, masks used: None = all)
    "linear, stride 16 (5c)": (("block5c_add",), 16, 0, None),
    "linear, stride 8 (3b+5c)": (("block3b_add", "block5c_add"), 8, 0, None),
    "linear, stride 4 (all five)": (ALL, 4, 0, None),
    "hidden 64, stride 8 (3b+5c)": (("block3b_add", "block5c_add"), 8, 64, None),
    "hidden 64, stride 4 (all five)": (ALL, 4, 64, None),
    "hidden 64, stride 4, 10 masks": (ALL, 4, 64, 10),
    "hidden 64, stride 4, 20 masks": (ALL, 4, 64, 20),
}


def hypercolumn(d: dict, stages, grid: int) -> np.ndarray:
    """The stages' features on a grid x grid map (okonly.py's stacking, no local means)."""
    return stacked(d, stages, False, grid)


def probe(feats: dict, size: int, stages, stride: int, hidden: int, masks: int | None) -> dict:
    import keras
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    keras.utils.set_random_seed(0)
    grid = size // stride
    bad, ok = hypercolumn(feats["train", "defect"], stages, grid), hypercolumn(feats["train", "ok"], stages, grid)
    truth = tf.image.resize(feats["train", "defect"]["masks"][..., None].astype(np.float32), (grid, grid), "area").numpy()[..., 0]
    if masks is not None:
        chosen = np.sort(np.random.default_rng(0).permutation(len(bad))[:masks])
        bad, truth = bad[chosen], truth[chosen]
    x = np.concatenate([bad, ok]).reshape(-1, bad.shape[-1])
    y = np.concatenate([truth, np.zeros(ok.shape[:3], np.float32)]).reshape(-1)
    keep = (y > 0) | (np.random.default_rng(0).random(len(y)) < 0.1)
    x, y = x[keep], y[keep]
    mean, spread = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / spread
    # Balanced as train's pixel loss (inspectd.toolkit.supervision): a cell's defect share y weighs it into the
    # defect half, 1 - y into the background half; each half sums to the same weight.
    weight = (0.5 * y / y.mean() + 0.5 * (1 - y) / (1 - y).mean()).astype(np.float32)
    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dense(hidden, activation="relu")(inputs) if hidden else inputs
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True))
    # The same number of steps for every probe (a coarse grid has 16 times fewer cells than a fine one).
    model.fit(x, y, sample_weight=weight, batch_size=1024, epochs=max(1, round(STEPS * 1024 / len(y))), verbose=0, shuffle=True)

    def maps(d):
        f = (hypercolumn(d, stages, grid) - mean) / spread
        m = model.predict(f.reshape(-1, f.shape[-1]), batch_size=65536, verbose=0).reshape(len(f), grid, grid)
        return tf.image.resize(m[..., None], (size, size), "bilinear").numpy()[..., 0]

    on_bad, on_ok = maps(feats["test", "defect"]), maps(feats["test", "ok"])
    test_masks = feats["test", "defect"]["masks"]
    ious = [((m >= 0) & t).sum() / max(((m >= 0) | t).sum(), 1) for m, t in zip(on_bad, test_masks, strict=True)]
    labels = np.r_[test_masks.reshape(-1), np.zeros(on_ok.size, bool)]
    scores = np.r_[on_bad.reshape(-1), on_ok.reshape(-1)]
    pick = np.random.default_rng(0).choice(len(labels), min(len(labels), 2_000_000), replace=False)
    peaks = np.r_[on_ok.reshape(len(on_ok), -1).max(1), on_bad.reshape(len(on_bad), -1).max(1)]
    return {
        "iou_at_logit_0": round(float(np.mean(ious)), 3),
        "pixel_roc_auc": round(float(roc_auc_score(labels[pick], scores[pick])), 3),
        "image_roc_auc": round(float(roc_auc_score(np.r_[np.zeros(len(on_ok)), np.ones(len(on_bad))], peaks)), 3),
        "masked_images": len(bad),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiles", type=Path, required=True, help="Magnetic Tile dataset folder: ok/ defect/ masks/")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "okonly", help="where benchmarks/okonly.py caches features")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, _ = split_tiles(args.tiles, args.out / "split", 0.25, 0)
    feats = features(train.parent, args.out, args.size)
    results = {}
    for name, (stages, stride, hidden, masks) in PROBES.items():
        results[name] = probe(feats, args.size, stages, stride, hidden, masks)
        print(f"hypercolumn: {name}: {results[name]}", flush=True)
    (args.out / "hypercolumn.json").write_text(json.dumps(results, indent=2))
    md = [
        f"`{' '.join(sys.argv)}`\n",
        "| head | masked images | IoU at logit 0 | pixel ROC-AUC | image ROC-AUC |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {r['masked_images']} | {r['iou_at_logit_0']} | {r['pixel_roc_auc']} | {r['image_roc_auc']} |"
        for n, r in results.items()
    ]
    (args.out / "hypercolumn.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
