"""What `check-config` and `run` check before anything binds: the model loads, the key files and certificates do.

These load files the configuration names, so they live here rather than in `inspectd.config`,
which only validates values.
"""

from __future__ import annotations

__all__ = ["check_model", "check_security", "check_dependencies"]

import importlib.util
from pathlib import Path

from inspectd.config import ModelConfig, Settings
from inspectd.errors import ConfigError, ModelFileError, NoInputError, UnavailableError, missing_extra
from inspectd.model.deployable import (
    BUILTIN_DEMO_MODEL,
    Deployable,
    keras_missing,
    load_model,
    read_manifest,
    read_metadata,
    resolve_model_path,
)
from inspectd.pipeline.runtimes import resolve_runtime
from inspectd.security import ServerKeys
from inspectd.service.web import web_security


def check_security(settings: Settings) -> None:
    """Load the key files and the certificate the daemon would (ConfigError naming the key): a secret file
    others can read, a file that is not a key, a certificate that does not match its key."""
    if settings.publish.curve_secret_key:
        ServerKeys.load(settings.publish.curve_secret_key, settings.publish.curve_clients)
    web_security(settings.metrics, "metrics")
    if settings.ui.enabled:
        web_security(settings.ui, "ui")


def check_dependencies(settings: Settings) -> None:
    """The optional packages the configuration asks for are installed (UnavailableError, exit 69, naming the
    extra): TensorFlow for a .keras model (an exported model folder needs none, and no runtime but the ones that
    read it: ConfigError otherwise), `[model] runtime` onnxruntime (and its converter for a .keras model) or
    openvino, a camera with a GStreamer `pipeline` or backend, or a genicam:// camera (Aravis, through PyGObject).
    Found without importing them (importlib.util.find_spec): a check costs no start-up time."""
    runtimes = {"onnxruntime": ("onnxruntime", "onnx", "tf2onnx"), "openvino": ("openvino",)}  # for a .keras model
    wanted: tuple[str, ...] = ()
    for entry in settings.model_entries:
        path = resolve_model_path(entry.path)
        if path.is_dir():
            _check_exported(entry.runtime, path, entry.path == BUILTIN_DEMO_MODEL)
            continue
        if path.is_file() and importlib.util.find_spec("keras") is None:
            raise keras_missing(path)
        wanted += runtimes.get(entry.runtime, ())
    if any(
        cam.pipeline is not None or cam.backend == "gstreamer" or (cam.url or "").lower().startswith("genicam:")
        for cam in settings.cameras
    ):
        wanted += ("gi",)
    for module in wanted:
        if importlib.util.find_spec(module) is None:
            missing = missing_extra(ModuleNotFoundError(name=module))
            assert missing is not None, module  # every module above is an extra's
            raise missing


def _check_exported(runtime: str, path: Path, builtin: bool) -> None:
    """`runtime` reads the exported model folder `path` and is installed, as the engine will resolve it (a bad
    folder is check_model's to say)."""
    try:
        fmt = str(read_manifest(path)["format"])
    except (ModelFileError, NoInputError):
        return
    try:
        resolve_runtime(runtime, "/CPU:0", graph_format=fmt)
    except ConfigError as exc:
        if builtin and runtime == "tensorflow":
            hint = "builtin:demo is the .keras file where TensorFlow is installed: pip install 'inspectd[tensorflow]'"
            raise ConfigError(f"{exc} ({hint})") from None
        raise


def check_model(cfg: ModelConfig, key: str = "model") -> list[str]:
    """Load the configured model as the daemon would (safe mode) and describe it; the daemon's exit codes on failure.

    NoInputError (66) for a missing file, ModelFileError (65) for anything that is not a deployable
    model; errors name the table (`key`: "model", or "models.ID" for a [[models]] table). The metadata
    is read first, so a bad path fails before TensorFlow is imported.
    """
    path = resolve_model_path(cfg.path)
    try:
        read_metadata(path)
        model = load_model(path)
    except (NoInputError, ModelFileError, UnavailableError) as exc:  # the same error and exit code as `run`, naming the key
        raise type(exc)(f"{key}.path: {exc}") from None
    shapes = _output_shapes(model, path)
    width, height = model.input_size
    thresholds = ", ".join(
        f"{what} {own}" if mine is None else f"{what} {mine} ({key}; the model's {own})"
        for what, key, mine, own in (
            ("score", f"{key}.threshold", cfg.threshold, model.threshold),
            (
                "mask rule",
                f"{key}.mask_rule",
                cfg.mask_rule or (None if cfg.mask_threshold is None else f"probability:{cfg.mask_threshold:g}"),
                model.mask_rule,
            ),
        )
    )
    how = "loaded in Keras safe mode" if model.model is not None else f"exported {model.graph_format} model of {model.name}"
    return [
        f"{key} {cfg.path}: {path} ({how})",
        f"  name {model.name}, backbone {model.meta.get('backbone', 'unknown')}, input {width}x{height} RGB 0..255",
        f"  outputs {shapes}, pooling {model.pooling}",
        f"  thresholds {thresholds}",
        f"  sha256 {model.sha256[:16]}",
    ]


def _output_shapes(model: Deployable, path: Path) -> str:
    """ "score [B], cam_logits [B, h, w]" from the Keras graph, or from an exported model's metadata."""
    if model.model is None:
        return f"score [B], cam_logits [B, {model.meta['cam']['height']}, {model.meta['cam']['width']}]"
    outputs = model.model.output if isinstance(model.model.output, dict) else {}
    missing = sorted({"score", "cam_logits"} - set(outputs))
    if missing:
        raise ModelFileError(f"{path}: the model has no output {', '.join(missing)}; not an inspectd deployable model")
    return ", ".join(
        f"{name} [{', '.join('B' if d is None else str(d) for d in outputs[name].shape)}]" for name in ("score", "cam_logits")
    )
