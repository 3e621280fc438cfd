"""`inspectd train --ok-only`: a first model from good parts only, with the deployable contract of any other.

    image -> Lite0 (ImageNet, frozen) -> stride 8 (block3b, 40 ch) + stride 16 (block5c, 112 ch, upsampled)
          -> 3x3 local mean of each (PatchCore's neighbourhood) -> F [h/8, w/8, 152]
          -> whitened: z = L^-1 (F - mu)        (a 1x1 convolution; Sigma = L L^T over ok locations)
          -> u = |z|^2 / C                         (the `okonly_distance` 1x1 convolution on z * z)
          -> cam_logits = ((u - m[i, j]) / s[i, j] - tau) / sigma   (`cam`, one scale and offset per location)
          -> score = sigmoid(max(cam_logits))   (the head's `max` pooling: score >= 0.5 <=> max >= tau)

A Gaussian of the pretrained features of ok images, as PaDiM (Defard et al. 2021) fits one, with
the mid-level features and local averaging PatchCore (Roth et al. 2022) found to matter; one mean
and one covariance shared by all locations rather than PaDiM's per location, so that parts need not
sit at the same place in every frame. The Mahalanobis distance of each location, standardised by
its mean m and spread s at that location over the ok images fitted (the borders sit far from the
pooled Gaussian on every image: zero padding, the part's edge), is the map; the largest is the
image's evidence. tau is the value that `far` of the held-back ok images exceed at their worst
location (the false-alarm rate aimed at, measured on images the model was not fitted on), sigma the
spread of those images' worst values, so a logit of 1 is one such spread.

Everything is Keras layers with fixed weights: standard ones, and `cam`, inspectd's registered
LocationAffine (a multiply and an add). `infer`, `evaluate`, export to ONNX Runtime and OpenVINO,
the daemon, events and live view run it as they run a supervised model. Its mask rule is
`probability:0.5`: the regions are the locations above the image threshold.

Why not a memory bank (PatchCore's nearest neighbour): one Gaussian is a 152 x 152 matrix in the
graph, where a bank is thousands of patches per image location to compare on a line PC's CPU. That
is the argument; a bank was not built or measured beside it.
"""

from __future__ import annotations

__all__ = ["STAGES", "fit_ok_only"]

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inspectd.errors import DataError, UsageError

# Lite0 layers whose outputs are the features (stride 8, stride 16); the map is at stride 8.
STAGES = ("block3b_add", "block5c_add")
MIN_OK = 10  # fewer ok images than this cannot say what normal looks like, nor set a threshold


def _log(msg: str) -> None:
    print(f"inspectd train --ok-only: {msg}", file=sys.stderr, flush=True)


def _features(size: tuple[int, int], weights: str):
    """Keras model: RGB 0..255 -> the locally averaged stride-8 + stride-16 features at stride 8."""
    import keras

    from inspectd.toolkit.efficientnet_lite0 import EfficientNetLite0

    w, h = size
    app = EfficientNetLite0(include_top=False, weights=weights if weights != "none" else None, input_shape=(h, w, 3))
    fine, coarse = (app.get_layer(name).output for name in STAGES)
    fine = keras.layers.AveragePooling2D(3, strides=1, padding="same", name="okonly_fine_mean")(fine)
    coarse = keras.layers.AveragePooling2D(3, strides=1, padding="same", name="okonly_coarse_mean")(coarse)
    coarse = keras.layers.UpSampling2D(2, interpolation="bilinear", name="okonly_coarse_up")(coarse)
    features = keras.layers.Concatenate(name="okonly_features")([fine, coarse])
    return keras.Model(app.input, features, name="okonly_features")


def _batches(items, size, batch_size: int):
    """Model inputs of `items`, `batch_size` at a time, each image resized as training and the daemon resize."""
    from inspectd.imageio import read_rgb
    from inspectd.pipeline.engine import preprocess

    w, h = size
    for start in range(0, len(items), batch_size):
        images = [read_rgb(it.path) for it in items[start : start + batch_size]]
        yield np.concatenate([np.asarray(preprocess(image[None], (h, w))) for image in images])


def _moments(features, items, size, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and covariance of the feature vectors of every location of every image (float64)."""
    total, outer, count = None, None, 0
    for n, batch in enumerate(_batches(items, size, batch_size), 1):
        f = np.asarray(features(batch, training=False), np.float64)
        flat = f.reshape(-1, f.shape[-1])
        total = flat.sum(0) if total is None else total + flat.sum(0)
        outer = flat.T @ flat if outer is None else outer + flat.T @ flat
        count += len(flat)
        if n % 5 == 0:
            _log(f"features of {min(n * batch_size, len(items))}/{len(items)} ok images")
    assert total is not None and outer is not None
    mean = total / count
    return mean, outer / count - np.outer(mean, mean), count


def _whitening(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [C, C], bias [C]) of z = L^-1 (f - mean), Sigma + eps I = L L^T; eps = 1 % of the mean variance
    (the shrinkage PaDiM adds: some channels barely vary on ok images and would blow up)."""
    c = len(mean)
    eps = 0.01 * float(np.trace(cov)) / c
    inv_l = np.linalg.inv(np.linalg.cholesky(cov + eps * np.eye(c)))
    return inv_l.T, -(inv_l @ mean)  # a 1x1 convolution computes f @ kernel + bias


def _deployable(features, kernel: np.ndarray, bias: np.ndarray, scale: np.ndarray, offset: np.ndarray):
    """The deployable model: whitened features, squared, their channel mean u (the `okonly_distance` 1x1
    convolution), then cam_logits = u * scale + offset per location (`cam`, a LocationAffine), score =
    sigmoid(max(cam_logits)). With scale 1 and offset 0 the map is u itself."""
    import keras

    from inspectd.model.head import Pooling, deployable_outputs, location_affine, pool_logit

    c = len(bias)
    whiten = keras.layers.Conv2D(c, 1, name="okonly_whiten", dtype="float32")
    z = whiten(features.output)
    squared = keras.layers.Multiply(name="okonly_squared")([z, z])
    distance = keras.layers.Conv2D(1, 1, name="okonly_distance", dtype="float32")
    cam = location_affine()(name="cam", dtype="float32")(distance(squared))
    score = keras.layers.Activation("sigmoid", name="prob", dtype="float32")(pool_logit(cam, Pooling("max")))
    model = keras.Model(features.input, deployable_outputs(cam, score), name="inspectd_okonly")
    whiten.set_weights([kernel.reshape(1, 1, c, c).astype(np.float32), bias.astype(np.float32)])
    distance.set_weights([np.full((1, 1, c, 1), 1.0 / c, np.float32), np.zeros(1, np.float32)])
    model.get_layer("cam").set_weights([scale[..., None].astype(np.float32), offset[..., None].astype(np.float32)])
    return model


def _maps(model, items, size, batch_size: int) -> np.ndarray:
    """cam_logits [n, h, w] of `items`."""
    return np.concatenate([np.asarray(model(batch, training=False)["cam_logits"]) for batch in _batches(items, size, batch_size)])


def fit_ok_only(opts, out: Path):
    """Fit the ok-only model of TrainOptions `opts` (ok_only set) and write it, its record and its plot to `out`."""
    from sklearn.metrics import roc_auc_score

    from inspectd.model.deployable import save_model
    from inspectd.toolkit import dataset as datasets
    from inspectd.toolkit.backbones import auto_input_size, check_input_size
    from inspectd.toolkit.pipeline import decode_check
    from inspectd.toolkit.plots import plot_ok_only

    if opts.backbone != "efficientnet_lite0":
        raise UsageError(f"--ok-only uses efficientnet_lite0's ImageNet features; --backbone {opts.backbone} is not offered")
    if not 0 < opts.far < 0.5:
        raise UsageError(f"--far {opts.far}: the false-alarm rate aimed at must be between 0 and 0.5, e.g. 0.02")
    data = datasets.scan(opts.dataset, require_both=False)
    oks = [it for it in data.items if it.label == 0]
    defects = [it for it in data.items if it.label == 1]
    if len(oks) < MIN_OK:
        raise DataError(f"{opts.dataset}: {len(oks)} ok image(s); --ok-only needs at least {MIN_OK} in ok/")
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(oks))
    n_held = max(2, round(len(oks) * opts.val_fraction))
    held = [oks[i] for i in sorted(order[:n_held])]
    fit = [oks[i] for i in sorted(order[n_held:])]
    _log(f"checking {len(data.items)} images")
    sizes = decode_check(datasets.Dataset(data.root, tuple(oks)))
    size = opts.input_size or auto_input_size(sizes)
    check_input_size(size, 16)
    _log(
        f"{len(fit)} ok images fit the Gaussian, {len(held)} held back set the threshold"
        + (f", {len(defects)} defect images only measure it" if defects else "")
        + f"; input {size[0]}x{size[1]}, efficientnet_lite0 (ImageNet) {' + '.join(STAGES)}"
    )
    features = _features(size, opts.weights)
    mean, cov, locations = _moments(features, fit, size, opts.batch_size)
    kernel, bias = _whitening(mean, cov)
    grid = features.output.shape[1:3]
    raw = _deployable(features, kernel, bias, np.ones(grid), np.zeros(grid))
    # Each location's distance standardised by its own spread on the ok images fitted: the borders (zero padding,
    # the part's edge) sit far from the pooled Gaussian on every image, ok or not.
    fit_maps = _maps(raw, fit, size, opts.batch_size).astype(np.float64)
    loc_mean, loc_std = fit_maps.mean(0), fit_maps.std(0) + 1e-3 * float(fit_maps.std())
    held_z = ((_maps(raw, held, size, opts.batch_size) - loc_mean) / loc_std).reshape(len(held), -1).max(1)
    # The (1 - far) quantile, taken upwards and nudged above it: at most `far` of the held-back images reach it (with
    # fewer than 1 / far of them that is the largest, and the rate measured there is 0).
    tau = float(np.quantile(held_z, 1.0 - opts.far, method="higher"))
    tau += 1e-6 * max(abs(tau), 1.0)
    sigma = float(max(np.std(held_z), 1e-3))
    # cam_logits = ((u - loc_mean) / loc_std - tau) / sigma, folded into one scale and offset per location
    model = _deployable(features, kernel, bias, 1.0 / (loc_std * sigma), -(loc_mean / loc_std + tau) / sigma)
    held_scores = (held_z - tau) / sigma
    held_far = float(np.mean(held_scores >= 0))
    record: dict = {
        "fit_images": len(fit),
        "fit_locations": int(locations),
        "held_back_images": len(held),
        "far_target": opts.far,
        "far_on_held_back": held_far,
        "tau": tau,
        "sigma": sigma,
        "features": list(STAGES),
        "channels": len(mean),
    }
    defect_scores = _maps(model, defects, size, opts.batch_size).reshape(len(defects), -1).max(1) if defects else np.array([])
    if len(defect_scores):
        labels = np.r_[np.zeros(len(held_scores)), np.ones(len(defect_scores))]
        record["image_roc_auc_held_back_vs_defects"] = float(roc_auc_score(labels, np.r_[held_scores, defect_scores]))
        record["defect_recall_at_threshold"] = float(np.mean(defect_scores >= 0))
    _log(
        f"threshold: held-back ok images over it {100 * held_far:.1f} % (aimed at {100 * opts.far:g} %, "
        f"{len(held)} images)"
        + (
            f"; defect images over it {100 * record['defect_recall_at_threshold']:.1f} %, image ROC-AUC "
            f"{record['image_roc_auc_held_back_vs_defects']:.3f} (held-back ok vs defects)"
            if len(defect_scores)
            else ""
        )
    )
    meta = {
        "name": out.stem,
        "source": {"kind": "ok-only"},
        "backbone": "efficientnet_lite0",
        "pooling": {"kind": "max", "param": None},
        "mask_rule": {"kind": "probability", "param": 0.5},
        "mask_rule_search": {"how": "the image threshold: the regions are the locations above it"},
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k not in ("out", "verbose")},
            "input_size": list(size),
            "ok_only": record,
        },
        "metrics": {"val": {k: v for k, v in record.items() if "auc" in k or "far" in k or "recall" in k}},
    }
    save_model(model, out, meta)
    history = out.with_suffix(".history.json")
    history.write_text(json.dumps({"ok_only": record, "held_back_scores": held_scores.tolist()}, indent=2))
    curves = plot_ok_only(held_scores, defect_scores, opts.far, out.with_suffix(".curves.png"))
    _log(f"wrote {out}, {history.name}, {curves.name}")
    return out, history, curves, record
