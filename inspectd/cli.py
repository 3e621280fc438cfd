"""Command line: parses arguments and hands an options object to library code. Nothing else."""

from __future__ import annotations

__all__ = ["main", "build_parser"]

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from inspectd import __version__, hangup
from inspectd.errors import ExitCode, InspectdError, UsageError, missing_extra
from inspectd.imageio import parse_size


def _config_path(args) -> Path:
    """--config, else the default config, which must be there."""
    from inspectd.config import DEFAULT_CONFIG
    from inspectd.errors import ConfigError

    if args.config is not None:
        return args.config
    if not DEFAULT_CONFIG.is_file():  # never a demo by accident: a line PC would publish synthetic defects
        raise ConfigError(
            f"{DEFAULT_CONFIG} not found: give --config FILE (a source checkout's config.example.toml runs the demo)"
        )
    return DEFAULT_CONFIG


def _settings(args):
    from inspectd.config import load_settings

    path = _config_path(args)
    return load_settings(path), path


def _cmd_run(args) -> int:
    import faulthandler

    from inspectd.service.checks import check_dependencies
    from inspectd.service.daemon import Daemon

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, path = _settings(args)
    check_dependencies(settings)
    # systemd's watchdog kills with SIGABRT: the journal then shows every thread's stack.
    faulthandler.enable()
    code = Daemon(settings, config_path=path).run()
    # Everything is stopped, flushed and closed ("stopped" is logged): leave now. The interpreter's own
    # teardown with TensorFlow and OpenVINO loaded can hang on their native threads (seen once in CI after a
    # reload to OpenVINO: "stopped", then no exit for 30 s), and a stopped service must end.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_check_config(args) -> int:
    from inspectd.service.checks import check_dependencies, check_model, check_security

    logging.basicConfig(level=logging.WARNING, format="inspectd check-config: %(levelname)s: %(message)s")
    settings, path = _settings(args)
    check_security(settings)
    check_dependencies(settings)
    print(f"# effective configuration from {path} (after INSPECTD_* environment overrides)")
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    keys = {entry.id: f"models.{entry.id}" if settings.models else "model" for entry in settings.model_entries}
    for entry in settings.model_entries:
        if getattr(args, "no_model", False):
            print(f"# {keys[entry.id]} {entry.path}: not loaded (--no-model)")
        else:
            print("\n".join(f"# {line}" for line in check_model(entry, keys[entry.id])))
    return 0


def _cmd_bench(args) -> int:
    from inspectd.bench import BenchOptions, bench, format_bench

    width, height = parse_size(args.size)
    res = bench(
        BenchOptions(
            model=args.model,
            batch=args.batch,
            cameras=args.cameras,
            camera_fps=args.camera_fps,
            width=width,
            height=height,
            seconds=args.seconds,
            device=args.device,
            runtime=args.runtime,
            precision=args.precision,
            cache_dir=args.cache_dir,
        )
    )
    print(json.dumps(res) if args.json else format_bench(res))
    # A frame account that does not balance is a bug in the pipeline, not a slow machine.
    return 0 if res["pipeline"]["residual"] == 0 else int(ExitCode.INTERNAL)


def _cmd_archive_export(args) -> int:
    from inspectd.outputs.export import ExportOptions, export_archive, parse_since

    opts = ExportOptions(
        archive=args.archive,
        out=args.out,
        cameras=tuple(args.camera or ()),
        since=parse_since(args.since) if args.since else None,
        until=parse_since(args.until) if args.until else None,
    )
    s = export_archive(opts)
    print(
        f"exported {s.defect} defect and {s.ok} ok frames to {args.out} ({s.matched} entries matched; "
        f"{s.already} exported before, {s.unusable} unusable). The folders are the model's verdicts: review "
        f"them before training; its masks are in {args.out / 'predictions'}, not masks/."
    )
    return 0


def _cmd_part(args) -> int:
    from inspectd.errors import ConfigError, NoInputError
    from inspectd.outputs.partlog import describe_part, find_parts

    root = args.archive
    if root is None:
        settings, path = _settings(args)
        if not settings.archive.dir:
            raise ConfigError(f"{path}: [archive] dir is empty: the part log lives in the archive (or give --archive DIR)")
        root = Path(settings.archive.dir)
    if not root.is_dir():
        raise NoInputError(f"{root}: no such folder (the archive, [archive] dir)")
    lines = list(find_parts(root, args.part_id, args.camera))
    if not lines:
        where = f" of camera {args.camera}" if args.camera else ""
        raise NoInputError(f"part {args.part_id!r}{where}: not in the part log under {root}")
    for line in lines:
        print(json.dumps(line) if args.json else describe_part(line))
    return 0


def _cmd_shadow(args) -> int:
    from inspectd.service.shadows import format_reports, promote, shadow_reports

    if args.verb == "report":
        settings, _ = _settings(args)
        reports = shadow_reports(settings)
        if args.json:
            print(
                json.dumps(
                    [{"model": r.model, "shadow": r.shadow, "folder": str(r.folder), **(r.summary or {})} for r in reports]
                )
            )
        else:
            print(format_reports(reports), end="")
        return 0
    config = _config_path(args)  # promote reads and checks it
    done = promote(config, args.model, dry_run=args.dry_run)
    if args.dry_run:
        print(done.text, end="")
        print(f"# dry run: {config} unchanged", file=sys.stderr)
        return 0
    print(
        f"promoted: model {done.model} now runs {done.new_path} (was {done.old_path}), the shadow {done.shadow} is "
        f"removed from {config}; the previous config is {done.backup}.\n"
        "Apply it: systemctl reload inspectd (SIGHUP): the new model is loaded and warmed up beside the running one, "
        "then swapped in at once."
    )
    return 0


def _bridge_settings(args):
    from inspectd.bridges.config import DEFAULT_BRIDGES_CONFIG, load_bridge_settings

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_bridge_settings(args.config or DEFAULT_BRIDGES_CONFIG)


def _cmd_proxy(args) -> int:
    from inspectd.bridges.proxy import Proxy

    return Proxy(_bridge_settings(args)).run()


def _cmd_bridge(args) -> int:
    settings = _bridge_settings(args)
    if args.verb == "mqtt":
        from inspectd.bridges.mqtt import MqttBridge

        return MqttBridge(settings).run()
    from inspectd.bridges.opcua import OpcUaBridge

    return OpcUaBridge(settings).run()


def _cmd_keys_generate(args) -> int:
    from inspectd.security import generate_keys

    public, secret = generate_keys(args.dir, args.name, owner=args.owner, force=args.force)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret, mode 0600: keep it here)")
    return 0


def _cmd_keys_hash_password(args) -> int:
    import getpass

    from inspectd.security import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    print(hash_password(password, args.rounds))
    return 0


def _cmd_train(args) -> int:
    from inspectd.toolkit.train import TrainOptions, train

    opts = TrainOptions(
        dataset=args.dataset,
        out=args.out,
        backbone=args.backbone,
        stride=args.stride,
        head=args.head,
        input_size=parse_size(args.input_size) if args.input_size else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weights=args.weights,
        val=args.val,
        val_fraction=args.val_fraction,
        seed=args.seed,
        balance=args.balance,
        augment=not args.no_augment,
        pooling=args.pooling,
        mask_rule=args.mask_rule,
        loss=args.loss,
        select=args.select,
        pixel_weight=args.pixel_weight,
        pixel_resolution=args.pixel_resolution,
        pixel_balanced=args.pixel_loss == "balanced",
        ok_negatives=not args.no_ok_negatives,
        pixel_head=args.pixel_head,
        mask_share=args.mask_share,
        ok_only=args.ok_only,
        far=args.far,
    )
    result = train(opts)
    print(
        json.dumps(
            {
                "model": str(result.model_path),
                "best_epoch": result.best_epoch,
                "val_roc_auc": result.val_metrics.get("roc_auc"),
                "val_f1": result.val_metrics.get("f1"),
            }
        )
    )
    return 0


def _cmd_convert(args) -> int:
    from inspectd.toolkit.convert import convert

    out = convert(args.classifier, args.out, args.input_range, args.threshold, args.mask_threshold)
    print(f"wrote {out}")
    return 0


def _cmd_export(args) -> int:
    from inspectd.toolkit.deploy import ExportOptions, run_export
    from inspectd.toolkit.gate import Tolerance

    runtime = args.runtime or {"onnx": "onnxruntime", "openvino": "openvino", None: None}[args.format]
    if runtime is None:
        raise UsageError("export: give --runtime (auto | onnxruntime | openvino | tensorflow) or --format")
    precision = "int8" if args.int8 else args.precision
    if args.int8 and args.precision not in ("float32", "int8"):
        raise UsageError(f"--int8 and --precision {args.precision}: one precision at a time")
    tolerance = Tolerance(args.max_image_auc_drop, args.max_pixel_auc_drop, args.max_iou_drop, args.max_verdict_change)
    options = ExportOptions(
        args.model, runtime, precision, args.cache_dir, args.out, args.calibration, args.validation, tolerance, args.seconds
    )
    return run_export(options)


def _cmd_infer(args) -> int:
    from inspectd.toolkit.infer import InferOptions, infer, raise_if_skipped

    opts = InferOptions(
        model=args.model,
        inputs=tuple(args.inputs),
        out=args.out,
        batch_size=args.batch_size,
        every_s=args.every,
        max_frames=args.max_frames,
        threshold=args.threshold,
        mask_threshold=args.mask_threshold,
        mask_rule=args.mask_rule,
        map_mode=args.map,
    )
    written, skipped = infer(opts)
    print(f"wrote {written} overlay/mask pairs and results.jsonl to {args.out}")
    raise_if_skipped(skipped)
    return 0


def _cmd_evaluate(args) -> int:
    from inspectd.toolkit.evaluate import EvalOptions, evaluate, format_table

    report = evaluate(EvalOptions(args.model, args.dataset, args.report, args.batch_size, args.threshold, args.mask_rule))
    print(format_table(report))
    if args.report:
        print(f"\nwrote {args.report / 'report.json'} and {args.report / 'roc_pr.png'}")
    return 0


def _cmd_synth(args) -> int:
    from inspectd.synth import write_dataset

    width, height = parse_size(args.size)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"inspectd synth: {done}/{total} images", file=sys.stderr, flush=True)

    try:
        summary = write_dataset(args.out, args.n, width, height, args.seed, args.defect_ratio, progress)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"wrote {summary.n_ok} ok + {summary.n_defect} defect images ({width}x{height}, masks in "
        f"{args.out / 'masks'}) to {args.out}"
    )
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to the help of every option that takes a value and has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "(default" in text:
            return text  # nothing to show, a flag (off unless given), or the help already says it
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """The parser of `inspectd` and of every subcommand (add_subparsers builds the same class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the binary classifier (seed recipe), save the deployable model",
        description="Train on DATASET/ok|defect (aliases 0|1, good|bad); writes MODEL.keras, "
        "MODEL.history.json and MODEL.curves.png.",
    )
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", type=Path, required=True, help="deployable model file (.keras)")
    # Defaults: the recipe docs/quality.md chose by measurement (the same as TrainOptions').
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (ImageNet weights offline) | efficientnetv2b0 | convnext_tiny | mobilenetv3large",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=16,
        choices=(8, 16, 32),
        help="16: truncated as in the paper; 8: atrous, a 2x finer map (efficientnet_lite0 only); 32: full",
    )
    p.add_argument(
        "--head",
        default="auto",
        choices=("auto", "cam", "hypercolumn"),
        help="the map: cam (a 1x1 convolution on the stride cut, the paper's) or hypercolumn (efficientnet_lite0's "
        "stages at stride 4 and a hidden layer: a 4x finer map); auto: hypercolumn when masks train the map, "
        "else cam; see docs/model.md",
    )
    p.add_argument("--input-size", help="WxH, multiples of the stride (default: median image size, rounded to 32)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=8, help="images per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up 15 %%, hold 10 %%, cosine)")
    p.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (offline for efficientnet_lite0; Keras downloads it for the others) | none (from scratch) | PATH",
    )
    p.add_argument("--val", type=Path, help="validation dataset (default: a stratified split of DATASET)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of DATASET held out when --val is not given")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the sampling and the weights")
    p.add_argument(
        "--balance",
        default="auto",
        choices=("auto", "oversample", "none"),
        help="auto: oversample to 50/50 when classes differ by more than 1.5x",
    )
    p.add_argument("--no-augment", action="store_true", help="switch the seed's augmentations off")
    p.add_argument(
        "--pooling",
        help="how the head pools cam_logits into the score (default: gap with the cam head, lse:5 with hypercolumn): gap, "
        "lse:R (log-mean-exp, sharpness R), topk:F (mean of the top F share of cells), max; "
        "see docs/model.md",
    )
    p.add_argument(
        "--mask-rule",
        help="how the map becomes a mask (default: minmax with the cam head, probability with hypercolumn): "
        "probability | relative | quantile | minmax; its parameter is picked on the validation masks when there are "
        "any (KIND:PARAM fixes it); see docs/model.md",
    )
    p.add_argument("--loss", default="focal", choices=("focal", "bce"), help="the image-level loss")
    p.add_argument(
        "--select",
        default="best",
        choices=("best", "last"),
        help="the epoch kept: best validation ROC-AUC (ties: lower loss), or the last",
    )
    g = p.add_argument_group(
        "mask supervision",
        "when DATASET/masks/ holds masks (any number), they train cam_logits beside the image labels; see docs/cli.md",
    )
    g.add_argument(
        "--pixel-weight",
        type=float,
        help="weight of the pixel loss against the image loss (default: 0.25 with the cam head, 1 with hypercolumn); "
        "0: labels only",
    )
    g.add_argument(
        "--pixel-resolution",
        type=int,
        default=4,
        choices=(1, 2, 4, 8, 16),
        help="input pixels per cell of the pixel loss's grid (the map is upsampled to it)",
    )
    g.add_argument(
        "--pixel-loss",
        default="balanced",
        choices=("balanced", "plain"),
        help="balanced: defect and background pixels weigh half each; plain: every pixel the same",
    )
    g.add_argument("--no-ok-negatives", action="store_true", help="do not use ok images' maps as all-background pixel targets")
    g.add_argument(
        "--mask-share",
        type=float,
        help="draw the defect images with a mask as at least this share of the images (at most half the defects' share; "
        "0: as found; default 0.25 with the hypercolumn head, 0 with cam)",
    )
    o = p.add_argument_group(
        "a first model from good parts only",
        "no labelled defects needed: DATASET/ok/ alone (defect/ images, when present, only measure the model); see docs/cli.md",
    )
    o.add_argument(
        "--ok-only",
        action="store_true",
        help="fit a Gaussian of pretrained features of ok images; the map is each location's distance from it",
    )
    o.add_argument(
        "--far",
        type=float,
        default=0.02,
        help="the false-alarm rate the threshold aims at, on ok images kept out of the fit (--val-fraction of ok/)",
    )
    g.add_argument(
        "--pixel-head",
        choices=("raw", "affine", "centred"),
        help="what the pixel loss sees: the map (raw), a*map+b, or a*(map - its mean)+b; a, b learnt, not deployed "
        "(default: centred with the cam head, raw with hypercolumn)",
    )
    p.set_defaults(func=_cmd_train)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a plain classifier (.keras/.h5/.hdf5/SavedModel) into the deployable model")
    p.add_argument("classifier", type=Path, help="plain classifier: .keras, .h5/.hdf5 or a Keras-2 SavedModel folder")
    p.add_argument("--out", type=Path, required=True, help="deployable model file (.keras)")
    p.add_argument(
        "--input-range",
        default="0-255",
        choices=("0-255", "0-1", "-1-1"),
        help="the input range the classifier expects (the deployable model always takes RGB 0..255)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="image-level threshold stored in the model")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="per-pixel threshold stored in the model")
    p.set_defaults(func=_cmd_convert)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="get a model ready for the daemon: convert it, measure runtime auto, check a precision (INT8: quantize)",
        description="Writes into the cache the daemon reads ([model] cache_dir): the model converted for a runtime; "
        "with --runtime auto, every runtime measured and the choice cached; with --precision other than float32, "
        "the quality gate against float32 (INT8: the calibrated model, kept only if it passes). "
        "See docs/performance.md#precision.",
    )
    p.add_argument("model", help="deployable .keras model, or builtin:demo")
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "openvino", "tensorflow"),
        help="the runtime to get ready for (auto: measure them all and print the table)",
    )
    p.add_argument("--format", choices=("onnx", "openvino"), help="the same as --runtime onnxruntime | openvino")
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16", "int8"),
        default="float32",
        help="anything but float32 is measured against float32 on labelled images first (the quality gate)",
    )
    p.add_argument("--int8", action="store_true", help="the same as --precision int8: calibrate, quantize, gate")
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="INT8: images to calibrate on (any folder of images; default: the model's training split)",
    )
    p.add_argument(
        "--validation",
        type=Path,
        metavar="DATASET",
        help="the gate's labelled images (DATASET/ok|defect[, masks/]; default: the training run's validation split)",
    )
    p.add_argument("--max-image-auc-drop", type=float, default=0.01, help="the gate: largest image ROC-AUC drop allowed")
    p.add_argument("--max-pixel-auc-drop", type=float, default=0.01, help="the gate: largest pixel ROC-AUC drop allowed")
    p.add_argument("--max-iou-drop", type=float, default=0.02, help="the gate: largest region IoU drop allowed")
    p.add_argument(
        "--max-verdict-change",
        type=float,
        default=0.02,
        help="the gate: largest share of validation images whose verdict at the model's threshold may change",
    )
    p.add_argument(
        "--seconds", type=float, default=2.0, help="--runtime auto: measuring time per candidate (runtime, hint, batch size)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="the daemon's [model] cache_dir (default: $CACHE_DIRECTORY, "
        "else ~/.cache/inspectd; for the service, /var/cache/inspectd)",
    )
    p.add_argument("--out", type=Path, help="float32: write the conversion to this folder instead of the cache")
    p.set_defaults(func=_cmd_export)


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="images / folders / videos -> overlays, masks, results.jsonl")
    p.add_argument("model", help="deployable .keras model, or builtin:demo (the bundled demo model)")
    p.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="image, video, folder of them, or dataset folder (ok/ defect/, 0/ 1/, good/ bad/)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for overlays, masks and results.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--every", type=float, default=1.0, help="videos: one frame per this many seconds")
    p.add_argument("--max-frames", type=int, default=0, help="videos: at most this many frames each (0: all)")
    p.add_argument("--threshold", type=float, help="image-level threshold (default: the model's)")
    p.add_argument(
        "--mask-threshold",
        type=float,
        help="a fixed probability threshold for regions, i.e. --mask-rule probability:VALUE (default: the model's own rule)",
    )
    p.add_argument(
        "--mask-rule",
        help="how the map becomes regions: probability:P | relative:D | quantile:Q | "
        "minmax:M (default: the model's own rule; see docs/model.md)",
    )
    p.add_argument(
        "--map",
        default="relative",
        choices=("relative", "probability"),
        help="the overlays' map: relative to each image's mask threshold (green = where regions are cut, drawn "
        "on defects only), or the calibrated probability sigmoid(cam_logits) on every image",
    )
    p.set_defaults(func=_cmd_infer)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="image-level and pixel-level (with masks/) quality report")
    p.add_argument("model", type=Path)
    p.add_argument("dataset", type=Path)
    p.add_argument("--report", type=Path, help="folder for report.json and roc_pr.png")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--threshold", type=float, help="image-level threshold (default: the model's)")
    p.add_argument("--mask-rule", help="how maps become masks, e.g. relative:2 or probability:0.5 (default: the model's)")
    p.set_defaults(func=_cmd_evaluate)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a synthetic defect dataset with masks")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--size", default="256x256", help="WxH")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same dataset")
    p.add_argument("--defect-ratio", type=float, default=0.5, help="share of defect images")
    p.set_defaults(func=_cmd_synth)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the daemon: cameras -> batched single-pass inference -> ZeroMQ events, metrics")
    p.add_argument("--config", type=Path, help="TOML file (default /etc/inspectd/config.toml; without it, an error)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level")
    p.set_defaults(func=_cmd_run)


def _add_check_config(sub) -> None:
    p = sub.add_parser("check-config", help="validate the config, print the effective values (exit 0, or 78 on error)")
    p.add_argument("--config", type=Path, help="TOML file (default /etc/inspectd/config.toml; without it, an error)")
    p.add_argument(
        "--no-model",
        action="store_true",
        help="validate the config only; by default the model is loaded too (safe mode), as `run` would",
    )
    p.set_defaults(func=_cmd_check_config)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="frames/s of the bare model and of the full pipeline, same batch size, one run")
    p.add_argument("--model", default="builtin:demo", help="deployable .keras model, or builtin:demo")
    p.add_argument("--batch", type=int, default=1, help="batch size of both measurements")
    p.add_argument("--cameras", type=int, default=2, help="synthetic cameras, each faster than the model")
    p.add_argument(
        "--camera-fps",
        type=float,
        help="frame rate of each synthetic camera (default: together 1.2x the bare model's frames/s, just above its capacity)",
    )
    p.add_argument("--size", default="320x240", help="camera frame size WxH")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time for each of the two")
    p.add_argument("--device", default="auto", help="auto | cpu | gpu:0")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "tensorflow", "onnxruntime", "openvino"),
        help="what runs the model, for both measurements ([model] runtime; auto prints its measurement)",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16", "float16", "int8"),
        help="[model] precision; anything but float32 needs its quality gate (inspectd export --precision)",
    )
    p.add_argument("--cache-dir", type=Path, help="[model] cache_dir: conversions, INT8 models, gates, auto's measurements")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_bench)


def _add_archive(sub) -> None:
    p = sub.add_parser("archive", help="the defect archive: export it as a dataset for review and retraining")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    e = verbs.add_parser("export", help="archive -> DATASET/defect, ok (the model's verdicts), predictions/, manifest.jsonl")
    e.add_argument("archive", type=Path, help="the archive folder ([archive] dir)")
    e.add_argument("--out", type=Path, required=True, help="dataset folder (created; exporting again adds what is new)")
    e.add_argument("--camera", action="append", metavar="ID", help="only this camera (repeatable)")
    e.add_argument("--since", metavar="T", help="captured at or after T: 2026-11-26, 2026-11-26T13:40:00Z, or an age: 24h, 7d")
    e.add_argument("--until", metavar="T", help="captured before T (same forms)")
    e.set_defaults(func=_cmd_archive_export)


def _add_part(sub) -> None:
    p = sub.add_parser(
        "part",
        help="what happened to a part (part mode): its verdict, why, when, from the part log",
        description="Every line the part log holds about PART_ID (docs/parts.md): verdict, action, reason, score, "
        "timings. Exit 0 when found, 66 when not.",
    )
    p.add_argument("part_id", metavar="PART_ID", help="the part's id (a file name, a camera frame id, a trigger's id)")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon config whose [archive] dir to read (default /etc/inspectd/config.toml)",
    )
    p.add_argument("--archive", type=Path, metavar="DIR", help="the archive folder instead of --config")
    p.add_argument("--camera", metavar="ID", help="only this camera's parts")
    p.add_argument("--json", action="store_true", help="one JSON object per line, as logged")
    p.set_defaults(func=_cmd_part)


def _add_shadow(sub) -> None:
    p = sub.add_parser(
        "shadow",
        help="a shadow model (docs/models.md): what it measured against production; promote it",
        description="A [[models]] table with shadow_of runs on its model's frames without publishing; the daemon "
        "measures how the two agree. report: those measurements (exit 0; 66 when a model file is missing). "
        "promote MODEL: rewrite the config so that MODEL runs its shadow's file (then reload the daemon).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    r = verbs.add_parser("report", help="each shadow's agreement with its model: verdicts, scores, regions, disagreements")
    r.add_argument("--config", type=Path, metavar="FILE", help="the daemon's config (default /etc/inspectd/config.toml)")
    r.add_argument("--json", action="store_true", help="the summaries as JSON")
    r.set_defaults(func=_cmd_shadow)
    m = verbs.add_parser("promote", help="MODEL runs its shadow's file from the next reload; the shadow's table goes")
    m.add_argument("model", metavar="MODEL", help="the id of the production model whose shadow to promote")
    m.add_argument("--config", type=Path, metavar="FILE", help="the daemon's config (default /etc/inspectd/config.toml)")
    m.add_argument("--dry-run", action="store_true", help="print the new config, change nothing")
    m.set_defaults(func=_cmd_shadow)


def _bridge_options(p) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the bridges' config (default /etc/inspectd/bridges.toml; docs/integration.md)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level")


def _add_proxy(sub) -> None:
    p = sub.add_parser(
        "proxy",
        help="many daemons as one ZeroMQ stream (XSUB/XPUB proxy), CURVE on both sides",
        description="Connect to every [[daemons]] endpoint and republish everything on [proxy] endpoint, "
        "untouched (docs/integration.md).",
    )
    _bridge_options(p)
    p.set_defaults(func=_cmd_proxy)


def _add_bridge(sub) -> None:
    p = sub.add_parser("bridge", help="carry the daemons' events to the plant: MQTT broker, OPC UA server")
    verbs = p.add_subparsers(dest="verb", metavar="KIND", required=True)
    m = verbs.add_parser(
        "mqtt",
        help="publish defect events, masks and camera status to an MQTT broker (QoS 1, "
        "persistent session, gaps filled from the daemons' replay)",
    )
    _bridge_options(m)
    m.set_defaults(func=_cmd_bridge)
    o = verbs.add_parser("opcua", help="serve each camera's last verdict and counters as OPC UA variables (for PLCs)")
    _bridge_options(o)
    o.set_defaults(func=_cmd_bridge)


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="CURVE key pairs for encrypted, authenticated events; password hashes for /metrics")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    g = verbs.add_parser(
        "generate",
        help="DIR/NAME.key (public, 0644) and DIR/NAME.key_secret (secret, 0600)",
        description="Make a CURVE key pair in ZeroMQ's certificate format (docs/security.md).",
    )
    g.add_argument("dir", type=Path, help="folder to write them in (created, 0755)")
    g.add_argument(
        "--name", default="server", help="file name: server for the daemon, the client's name for a client (default %(default)s)"
    )
    g.add_argument(
        "--owner",
        metavar="USER[:GROUP]",
        help="chown both files (as root): the user that reads the secret one, e.g. inspectd for the daemon's",
    )
    g.add_argument("--force", action="store_true", help="replace an existing pair")
    g.set_defaults(func=_cmd_keys_generate)
    h = verbs.add_parser("hash-password", help="a bcrypt hash for [metrics] basic_auth_users (password from stdin or a prompt)")
    h.add_argument(
        "--rounds",
        type=int,
        default=12,
        choices=range(10, 16),
        metavar="10-15",
        help="bcrypt cost (default %(default)s: about 0.2 s per check; checked once per client, then remembered)",
    )
    h.set_defaults(func=_cmd_keys_hash_password)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inspectd",
        description="Streaming defect inspection: single-pass score + CAM mask, ZeroMQ events, "
        "Prometheus metrics; and the model toolkit.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage, 65 bad data/model, 66 missing input, "
        "69 unavailable (e.g. ImageNet weights offline), 77 refused by a daemon's key check, 78 config error, "
        "130 interrupted. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"inspectd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from inspectd.watch import add_parser as _add_watch

    commands = (
        _add_run,
        _add_check_config,
        _add_watch,
        _add_bench,
        _add_archive,
        _add_part,
        _add_shadow,
        _add_keys,
        _add_proxy,
        _add_bridge,
        _add_train,
        _add_convert,
        _add_export,
        _add_infer,
        _add_evaluate,
        _add_synth,
    )
    for add in commands:
        add(sub)
    return parser


# The daemon imports TensorFlow itself, after logging is set up.
_TF_COMMANDS = {"train", "convert", "export", "infer", "evaluate"}


# Imported only by the offline tools (train/evaluate), installed by the `toolkit` extra.
def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever the exception put in it (every stderr error is one line)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in hangup.SERVICES:
        hangup.release()  # held by __main__ for the services only: a one-off command ends on SIGHUP as usual
    try:
        if args.command in _TF_COMMANDS:
            from inspectd.tfload import import_tensorflow

            import_tensorflow()
        return args.func(args)
    except InspectdError as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "verb", None))))
        print(f"inspectd {command}: error: {_one_line(exc)}", file=sys.stderr)
        return int(exc.exit_code)
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        print(f"inspectd {args.command}: error: {missing}", file=sys.stderr)
        return int(missing.exit_code)
    except KeyboardInterrupt:
        print(f"inspectd {args.command}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("INSPECTD_DEBUG"):
            raise
        print(
            f"inspectd {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(set INSPECTD_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return int(ExitCode.INTERNAL)
