"""`inspectd train --ok-only`: a first model from good parts only, with the deployable contract of any other.

    image -> Lite0 (ImageNet, frozen) -> stride 8 (block3b, 40 ch) + stride 16 (block5c, 112 ch, upsampled)
          + stride 32 (block6d, 192 ch, upsampled) -> a fixed random 100 of the 344 channels (`okonly_select`)
          -> F [h/8, w/8, 100]
          -> whitened at every location: z[i, j] = L[i, j]^-1 (F[i, j] - mu[i, j])   (`okonly_whiten`,
             inspectd's LocationWhiten; Sigma[i, j] = L L^T over the ok images fitted)
          -> u = |z|^2 / C                          (the `okonly_distance` 1x1 convolution on z * z)
          -> cam_logits = (u - tau) / sigma           (`cam`)
          -> score = sigmoid(max(cam_logits))       (the head's `max` pooling: score >= 0.5 <=> max >= tau)

PaDiM (Defard et al. 2021): a Gaussian of the pretrained features at every location of the image, with
a random subset of the channels (its dimensionality reduction). Each location's mean and covariance
pool the 3 x 3 locations around it over the ok images fitted, so a part may sit a cell (8 input pixels)
off where it sat in training. The Mahalanobis distance of each location is the map; the largest is the image's
evidence. tau is the value that `far` of the held-back ok images exceed at their worst location (the
false-alarm rate aimed at, measured on images the model was not fitted on), sigma the spread of those
images' worst values, so a logit of 1 is one such spread.

What it costs: C x C = 10 000 weights (20 KB in float16) per location, 20 MB of them at 256 x 256 (a 32 x 32
map; a 31 MB file with the backbone), and about 45 000 multiply-adds per location with the channel selection
(45 M at 256 x 256, under a tenth of Lite0's). `infer`, `evaluate`, export to ONNX Runtime and OpenVINO,
the daemon, events and live view run it as they run a supervised model. Its mask rule is
`probability:0.5`: the regions are the locations above the image threshold.

Chosen on the magnetic tiles' training split (held-back ok images against its defect images), side by
side (docs/quality.md#a-first-model-from-good-parts-only): one Gaussian shared by all locations with each
location's distance standardised (the first version), with 3 x 3 local means of the features, with more
or fewer stages, top-k pooling, and a nearest-neighbour memory bank (PatchCore, Roth et
al. 2022) in place of the Gaussian. The per-location Gaussian won by 0.04 image ROC-AUC over the bank and
0.06 over the shared Gaussian.
"""

from __future__ import annotations

__all__ = ["CHANNELS", "STAGES", "fit_ok_only"]

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inspectd.errors import DataError, UsageError

# Lite0 layers whose outputs are the features (strides 8, 16, 32); the map is at stride 8.
STAGES = ("block3b_add", "block5c_add", "block6d_add")
CHANNELS = 100  # PaDiM's random subset: a C x C matrix per location, and enough ok images to estimate it
NEIGHBOURS = 1  # a location's Gaussian pools the locations within 1 cell (3 x 3) of it
# The default input's long side: the file holds a C x C matrix per location (40 KB), 92 MB at 384 x 384.
MAX_AUTO_SIDE = 384
MIN_OK = 10  # fewer ok images than this cannot say what normal looks like, nor set a threshold


# train's options that only a trained head takes: the file's own pooling and mask rule say what this model does.
_NOT_OURS = ("out", "verbose", "head", "pooling", "mask_rule", "pixel_weight", "pixel_head")


def _log(msg: str) -> None:
    print(f"inspectd train --ok-only: {msg}", file=sys.stderr, flush=True)


def _features(size: tuple[int, int], weights: str, rng: np.random.Generator):
    """(Keras model: RGB 0..255 -> the stride-8, 16 and 32 features at stride 8, CHANNELS of them drawn by `rng`,
    the channels kept)."""
    import keras

    from inspectd.toolkit.backbones import stages_on_grid

    stacked = stages_on_grid(size, STAGES, 8, weights, "okonly_features", "okonly_stages")
    features = stacked.output
    keep = np.sort(rng.choice(features.shape[-1], CHANNELS, replace=False))
    select = keras.layers.Conv2D(CHANNELS, 1, use_bias=False, name="okonly_select", dtype="float32")
    picked = select(features)
    pick = np.zeros((features.shape[-1], CHANNELS), np.float32)
    pick[keep, np.arange(CHANNELS)] = 1.0
    select.set_weights([pick[None, None]])
    return keras.Model(stacked.input, picked, name="okonly_features"), keep


def _batches(items, size, batch_size: int):
    """Model inputs of `items`, `batch_size` at a time, each image resized as training and the daemon resize."""
    from inspectd.imageio import read_rgb
    from inspectd.pipeline.engine import preprocess

    w, h = size
    for start in range(0, len(items), batch_size):
        images = [read_rgb(it.path) for it in items[start : start + batch_size]]
        yield np.concatenate([np.asarray(preprocess(image[None], (h, w))) for image in images])


def _moments(features, items, size, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean [h, w, C] and covariance [h, w, C, C] at every location, each over the feature vectors of the
    locations within NEIGHBOURS cells of it in every image (float64, accumulated a batch at a time)."""
    total, outer, count = None, None, 0
    for n, batch in enumerate(_batches(items, size, batch_size), 1):
        f = np.asarray(features(batch, training=False), np.float64)
        by_location = f.reshape(len(f), -1, f.shape[-1]).transpose(1, 0, 2)  # [h*w, n, C]
        products = (by_location.transpose(0, 2, 1) @ by_location).reshape(*f.shape[1:], f.shape[-1])
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = products if outer is None else outer + products
        count += len(f)
        if n % 5 == 0:
            _log(f"features of {min(n * batch_size, len(items))}/{len(items)} ok images")
    assert total is not None and outer is not None
    total, outer = _neighbourhood(total), _neighbourhood(outer)
    samples = _neighbourhood(np.full(total.shape[:2], float(count)))
    mean = total / samples[..., None]
    cov = outer / samples[..., None, None] - mean[..., :, None] * mean[..., None, :]
    return mean, cov, count * int(np.prod(mean.shape[:2]))


def _neighbourhood(moment: np.ndarray) -> np.ndarray:
    """Sums over the locations within NEIGHBOURS cells (the first two axes), fewer at the border. Moments add, so
    the neighbourhood's mean and covariance come from these sums."""
    h, w = moment.shape[:2]
    out = np.zeros_like(moment)
    for di in range(-NEIGHBOURS, NEIGHBOURS + 1):
        for dj in range(-NEIGHBOURS, NEIGHBOURS + 1):
            src = moment[max(di, 0) : h + min(di, 0), max(dj, 0) : w + min(dj, 0)]
            out[max(-di, 0) : h + min(-di, 0), max(-dj, 0) : w + min(-dj, 0)] += src
    return out


def _whitening(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [h, w, C, C], bias [h, w, C]) of z = L^-1 (f - mean) at every location, Sigma + eps I = L L^T;
    eps = 1 % of the location's mean variance (the shrinkage PaDiM adds: some channels barely vary on ok
    images and would blow up)."""
    c = mean.shape[-1]
    eps = 0.01 * np.trace(cov, axis1=-2, axis2=-1) / c
    inv_l = np.linalg.inv(np.linalg.cholesky(cov + eps[..., None, None] * np.eye(c)))
    return inv_l, -np.einsum("hwcd,hwd->hwc", inv_l, mean)


def _deployable(features, kernel: np.ndarray, bias: np.ndarray, tau: float, sigma: float):
    """The deployable model: features whitened at every location (`okonly_whiten`), squared, their channel mean u
    (the `okonly_distance` 1x1 convolution), cam_logits = (u - tau) / sigma (`cam`), score = sigmoid(max(cam_logits)).
    With tau 0 and sigma 1 the map is u itself."""
    import keras

    from inspectd.model.head import Pooling, deployable_outputs, location_whiten, pool_logit

    c = bias.shape[-1]
    # The matrices in float16: half the file (they are most of it), the map within 1e-3 of float32 (tested).
    whiten = location_whiten()(storage="float16", name="okonly_whiten", dtype="float32")
    z = whiten(features.output)
    squared = keras.layers.Multiply(name="okonly_squared")([z, z])
    distance = keras.layers.Conv2D(1, 1, name="okonly_distance", dtype="float32")
    cam = keras.layers.Rescaling(1.0 / sigma, offset=-tau / sigma, name="cam", dtype="float32")(distance(squared))
    score = keras.layers.Activation("sigmoid", name="prob", dtype="float32")(pool_logit(cam, Pooling("max")))
    model = keras.Model(features.input, deployable_outputs(cam, score), name="inspectd_okonly")
    whiten.set_weights([kernel.astype(np.float16), bias.astype(np.float32)])
    distance.set_weights([np.full((1, 1, c, 1), 1.0 / c, np.float32), np.zeros(1, np.float32)])
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
    size = opts.input_size or auto_input_size(sizes, longest=MAX_AUTO_SIDE)
    check_input_size(size, 32)
    _log(
        f"{len(fit)} ok images fit the Gaussian, {len(held)} held back set the threshold"
        + (f", {len(defects)} defect images only measure it" if defects else "")
        + f"; input {size[0]}x{size[1]}, efficientnet_lite0 (ImageNet) {' + '.join(STAGES)}"
    )
    features, keep = _features(size, opts.weights, rng)
    grid = features.output.shape[1:3]
    _log(
        f"a {grid[1]}x{grid[0]} map: a Gaussian of {CHANNELS} channels at each location, "
        f"{4 * CHANNELS * (CHANNELS + 1) * grid[0] * grid[1] / 1e6:.0f} MB of weights"
    )
    mean, cov, locations = _moments(features, fit, size, opts.batch_size)
    kernel, bias = _whitening(mean, cov)
    raw = _deployable(features, kernel, bias, 0.0, 1.0)
    held_z = _maps(raw, held, size, opts.batch_size).reshape(len(held), -1).max(1).astype(np.float64)
    # The (1 - far) quantile, taken upwards and nudged above it: at most `far` of the held-back images reach it (with
    # fewer than 1 / far of them that is the largest, and the rate measured there is 0).
    tau = float(np.quantile(held_z, 1.0 - opts.far, method="higher"))
    tau += 1e-6 * max(abs(tau), 1.0)
    sigma = float(max(np.std(held_z), 1e-3))
    model = _deployable(features, kernel, bias, tau, sigma)
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
        "channels": [int(k) for k in keep],
        "neighbourhood": 2 * NEIGHBOURS + 1,
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
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k not in _NOT_OURS},
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
