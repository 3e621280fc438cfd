#!/usr/bin/env python
"""Models from good parts only, side by side (not run in CI): which statistics of which Lite0 features.

    .venv/bin/python benchmarks/okonly.py --tiles DIR [--out runs/okonly] [--size 256]

1. Splits of the Magnetic Tile dataset (ok/ defect/ masks/, docs/quality.md): the stratified 25 % test
   split (seed 0, as benchmarks/quality.py, localization.py and supervision.py), and a defect type held
   out (ok + blowholes for training, cracks in the test).
2. Lite0 (ImageNet) features of every image at every stage used, computed once (OUT/features-*.npz).
3. Each variant is fitted on the training split's ok images less 20 % held back, and measured on the
   held-back ok images against the training split's defect images ("val": what the choice was made
   on) and on the test split ("test", never used for a choice): image ROC-AUC (max of the map) and
   pixel ROC-AUC (the map, upsampled bilinearly, on defect and ok images; 2 M pixels sampled).
4. The shipped model: `inspectd train --ok-only` on each training split, `inspectd evaluate` on its test
   split (the threshold in the file, the false alarms on ok images it gives, AUPRO).

Results: OUT/summary.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from localization import run, split_by_type  # benchmarks/ is the script's own folder
from quality import split_tiles

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("block2b_add", "block3b_add", "block4c_add", "block5c_add", "block6d_add")
FIRST = ("block3b_add", "block5c_add")  # the first version's stages
SHIPPED = ("block3b_add", "block5c_add", "block6d_add")

# name -> (how, options): "shared" one Gaussian for all locations, "local" a Gaussian per location (PaDiM), "bank" the
# nearest of a 10 % random sample of the ok patches (PatchCore without its coreset). `mean3`: 3x3 local means of the
# features first; `std`: each location's distance standardised by its mean and spread on the ok images fitted.
VARIANTS = {
    "shared, 3b+5c, 3x3 means, standardised (the first version)": ("shared", dict(stages=FIRST, mean3=True, std=True)),
    "the same, not standardised": ("shared", dict(stages=FIRST, mean3=True, std=False)),
    "the same, top-10 locations pooled": ("shared", dict(stages=FIRST, mean3=True, std=True, top=10)),
    "shared, 3b+5c, no local means, standardised": ("shared", dict(stages=FIRST, std=True)),
    "shared, 3b+5c+6d, no local means, standardised": ("shared", dict(stages=SHIPPED, std=True)),
    "shared, all five stages, no local means, standardised": ("shared", dict(stages=STAGES, std=True)),
    "bank 10 %, 3b+5c+6d, standardised": ("bank", dict(stages=SHIPPED, std=True)),
    "per location, 3b+5c, 100 channels": ("local", dict(stages=FIRST, channels=100)),
    "per location, 3b+5c+6d, 50 channels": ("local", dict(stages=SHIPPED, channels=50)),
    "per location, 3b+5c+6d, 100 channels (shipped)": ("local", dict(stages=SHIPPED, channels=100)),
}


def features(split: Path, out: Path, size: int) -> dict:
    """{(part, label): {stage: [n, h, w, c] float16, "masks": [n, size, size] bool}}, cached in OUT."""
    import cv2
    import keras

    from inspectd.imageio import read_rgb
    from inspectd.pipeline.engine import preprocess
    from inspectd.toolkit.efficientnet_lite0 import EfficientNetLite0

    model = None
    result = {}
    for part in ("train", "test"):
        for label in ("ok", "defect"):
            cache = out / f"features-{split.name}-{part}-{label}-{size}.npz"
            if not cache.exists():
                if model is None:
                    app = EfficientNetLite0(include_top=False, weights="imagenet", input_shape=(size, size, 3))
                    model = keras.Model(app.input, [app.get_layer(s).output for s in STAGES])
                files = sorted((split / part / label).iterdir())
                got: dict = {s: [] for s in STAGES}
                for i in range(0, len(files), 16):
                    batch = np.concatenate([np.asarray(preprocess(read_rgb(f)[None], (size, size))) for f in files[i : i + 16]])
                    for s, o in zip(STAGES, model(batch, training=False), strict=True):
                        got[s].append(np.asarray(o, np.float16))
                masks = [
                    cv2.resize(
                        cv2.imread(str(split / part / "masks" / f"{f.stem}.png"), 0), (size, size), interpolation=cv2.INTER_AREA
                    )
                    > 127
                    for f in files
                    if label == "defect"
                ]
                np.savez(cache, **{s: np.concatenate(v) for s, v in got.items()}, masks=np.array(masks, bool))
                print(f"okonly: features of {split.name}/{part}/{label}: {len(files)} images", flush=True)
            result[part, label] = dict(np.load(cache))
    return result


def stacked(d: dict, stages, mean3: bool, grid: int) -> np.ndarray:
    """The stages' features on a grid x grid map (finer ones average-pooled, coarser ones upsampled bilinearly),
    float32."""
    import tensorflow as tf

    parts = []
    for s in stages:
        x = d[s].astype(np.float32)
        if mean3:
            x = tf.nn.avg_pool2d(x, 3, 1, "SAME").numpy()
        if x.shape[1] > grid:
            x = tf.nn.avg_pool2d(x, x.shape[1] // grid, x.shape[1] // grid, "VALID").numpy()
        elif x.shape[1] < grid:
            x = tf.image.resize(x, (grid, grid), "bilinear").numpy()
        parts.append(x)
    return np.concatenate(parts, -1)


def shared_gaussian(fit: np.ndarray):
    c = fit.shape[-1]
    mu = fit.reshape(-1, c).mean(0, dtype=np.float64)
    cen = fit.reshape(-1, c) - mu
    cov = cen.T @ cen / len(cen)
    inv_l = np.linalg.inv(np.linalg.cholesky(cov + 0.01 * np.trace(cov) / c * np.eye(c)))
    return lambda x: (((x - mu) @ inv_l.T) ** 2).mean(-1)


def local_gaussian(fit: np.ndarray, channels: int, rng):
    """The shipped model's statistics (inspectd.toolkit.okonly), in numpy: a Gaussian of `channels` random channels
    at every location, over the 3x3 locations around it."""
    from inspectd.toolkit.okonly import _neighbourhood, _whitening

    keep = np.sort(rng.choice(fit.shape[-1], channels, replace=False))
    f = fit[..., keep].astype(np.float64)
    n, h, w, c = f.shape
    by_location = f.reshape(n, -1, c).transpose(1, 0, 2)
    total, outer = _neighbourhood(f.sum(0)), _neighbourhood((by_location.transpose(0, 2, 1) @ by_location).reshape(h, w, c, c))
    count = _neighbourhood(np.full((h, w), float(n)))
    mean = total / count[..., None]
    kernel, bias = _whitening(mean, outer / count[..., None, None] - mean[..., :, None] * mean[..., None, :])
    return lambda x: ((np.einsum("hwcd,nhwd->nhwc", kernel, x[..., keep]) + bias) ** 2).mean(-1)


def memory_bank(fit: np.ndarray, rng):
    c = fit.shape[-1]
    flat = fit.reshape(-1, c)
    bank = flat[rng.choice(len(flat), len(flat) // 10, replace=False)]
    norms = (bank * bank).sum(1)

    def distance(x):
        q = x.reshape(-1, c)
        d = [
            ((q[i : i + 4096] ** 2).sum(1)[:, None] + norms - 2 * q[i : i + 4096] @ bank.T).min(1) for i in range(0, len(q), 4096)
        ]
        return np.sqrt(np.maximum(np.concatenate(d), 0)).reshape(x.shape[:3])

    return distance


def measure(how: str, opts: dict, feats: dict, size: int) -> dict:
    from sklearn.metrics import roc_auc_score

    grid = size // 8
    rng = np.random.default_rng(0)
    ok = stacked(feats["train", "ok"], opts["stages"], opts.get("mean3", False), grid)
    order = rng.permutation(len(ok))
    n_held = round(0.2 * len(ok))
    held, fit = ok[np.sort(order[:n_held])], ok[np.sort(order[n_held:])]
    if how == "shared":
        distance = shared_gaussian(fit)
    elif how == "local":
        distance = local_gaussian(fit, opts["channels"], rng)
    else:
        distance = memory_bank(fit, rng)
    if opts.get("std"):
        fitted = distance(fit)
        mean, spread = fitted.mean(0), fitted.std(0) + 1e-3 * fitted.std()
        raw = distance

        def distance(x):
            return (raw(x) - mean) / spread

    top = opts.get("top", 1)
    result = {}
    for name, oks, part in (("val", held, "train"), ("test", None, "test")):
        oks = stacked(feats[part, "ok"], opts["stages"], opts.get("mean3", False), grid) if oks is None else oks
        bad = stacked(feats[part, "defect"], opts["stages"], opts.get("mean3", False), grid)
        maps_ok, maps_bad = distance(oks), distance(bad)
        scores = [np.sort(m.reshape(len(m), -1), 1)[:, -top:].mean(1) for m in (maps_ok, maps_bad)]
        image = roc_auc_score(np.r_[np.zeros(len(oks)), np.ones(len(bad))], np.r_[scores[0], scores[1]])
        result[name] = {
            "image_roc_auc": round(float(image), 3),
            "pixel_roc_auc": round(pixel_auc(maps_ok, maps_bad, feats[part, "defect"]["masks"], size), 3),
        }
    return result


def pixel_auc(maps_ok, maps_bad, masks, size: int) -> float:
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    def up(m):
        return tf.image.resize(m[..., None].astype(np.float32), (size, size), "bilinear").numpy().reshape(-1)

    truth = np.r_[masks.reshape(-1), np.zeros(len(maps_ok) * size * size, bool)]
    scores = np.r_[up(maps_bad), up(maps_ok)]
    pick = np.random.default_rng(0).choice(len(truth), min(len(truth), 2_000_000), replace=False)
    return float(roc_auc_score(truth[pick], scores[pick]))


def shipped(train: Path, test: Path, out: Path) -> dict:
    model = out / "ok-only.keras"
    if not model.exists():
        run("train", train, "--ok-only", "--out", model)
    if not (out / "report" / "report.json").exists():
        run("evaluate", model, test, "--report", out / "report")
    rep = json.loads((out / "report" / "report.json").read_text())
    pub, cal = rep["pixel"]["published"], rep["pixel"]["calibrated"]
    return {
        "image_roc_auc": round(rep["image"]["roc_auc"], 3),
        "pixel_roc_auc": round(cal["roc_auc"], 3),
        "aupro": round(cal["aupro"], 3),
        # The rule is probability:0.5: an image has a region exactly when its score reaches the threshold.
        "ok_images_flagged": round(pub["false_region_rate"], 3),
        "defect_images_flagged": round(rep["image"]["recall"], 3),
        "iou": round(pub["iou"], 3),
        "model_mb": round(model.stat().st_size / 1e6),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiles", type=Path, required=True, help="Magnetic Tile dataset folder: ok/ defect/ masks/")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "okonly")
    ap.add_argument("--size", type=int, default=256, help="square input size of the variants (a multiple of 32)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {
        "tiles 25 % test split": split_tiles(args.tiles, args.out / "split", 0.25, 0),
        "held-out type: ok + blowholes fitted/measured, cracks in the test": split_by_type(
            args.tiles, args.out / "split-type", "blowhole", "crack"
        ),
    }
    results: dict = {}
    for title, (train, test) in splits.items():
        feats = features(train.parent, args.out, args.size)
        rows = {}
        for name, (how, opts) in VARIANTS.items():
            rows[name] = measure(how, opts, feats, args.size)
            print(f"okonly: {title}: {name}: {rows[name]}", flush=True)
        results[title] = {"variants": rows, "shipped": shipped(train, test, args.out / train.parent.name)}
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    md = [f"`{' '.join(sys.argv)}`\n"]
    for title, res in results.items():
        md += [f"### {title}\n", "| variant | val image | val pixel | test image | test pixel |", "|---|---|---|---|---|"]
        for n, r in res["variants"].items():
            cells = [r[part][metric] for part in ("val", "test") for metric in ("image_roc_auc", "pixel_roc_auc")]
            md.append(f"| {n} | " + " | ".join(map(str, cells)) + " |")
        md += [
            "",
            "shipped (`inspectd train --ok-only`, `inspectd evaluate` on the test split): " + json.dumps(res["shipped"]),
            "",
        ]
    (args.out / "summary.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
