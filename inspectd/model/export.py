"""The deployable model for other runtimes: ONNX (ONNX Runtime) and OpenVINO IR, converted from the `.keras` file.

The `.keras` file stays the one artefact: a runtime other than TensorFlow converts it at start-up
and keeps the result in a cache keyed by the model's sha256, so the conversion runs once per
model and machine (`inspectd export` does it ahead of time). The exported graph is the Keras
model as is: input `image` float32 [N, h, w, 3] RGB 0..255 at the model's input size (the input
normalization inside), outputs `score` [N] and `cam_logits` [N, h', w']. Cast and resize from
camera frames happen once, before any runtime (`inspectd.pipeline.engine`).

Both conversions start from a TensorFlow SavedModel of the Keras model. ONNX goes through
tf2onnx's command line (its documented interface; Keras' own `export(format="onnx")` and
`tf2onnx.from_function` turn the Normalization layer's constants into graph inputs, measured),
OpenVINO through `openvino.convert_model`, weights kept in float32.

Every conversion is an exported model (`inspectd.model.deployable`): the graph and a manifest
(STAMP) with the model's metadata, so a cache entry, or a folder written with `--out`, is what a
daemon without TensorFlow runs. An exported model as the source needs no conversion: ONNX Runtime
runs its ONNX graph, OpenVINO either graph.
"""

from __future__ import annotations

__all__ = [
    "FORMATS",
    "EXTRAS",
    "default_cache_dir",
    "cache_root",
    "export",
    "export_folder",
    "cached_export",
    "converter_version",
    "int8_entry",
    "cached_int8",
    "store_entry",
]

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from inspectd import __version__
from inspectd.errors import ConfigError, ModelFileError, UnavailableError, UsageError
from inspectd.model.deployable import EXPORT_FORMAT, EXPORT_MANIFEST, Deployable, file_sha256

log = logging.getLogger("inspectd.model.export")

FORMATS = ("onnx", "openvino")
# format -> (the packages its conversion needs, the extra that installs them)
EXTRAS = {"onnx": (("tf2onnx", "onnx"), "onnx"), "openvino": (("openvino",), "openvino")}
ONNX_OPSET = 17
CONVERT_TIMEOUT_S = 1800  # a 752x480 EfficientNetV2B0 takes 28 s on 2 cores
STALE_TMP_S = 3600  # a temporary folder this old was left by a conversion that was killed
_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
STAMP = EXPORT_MANIFEST  # written last: an entry with it is complete


def default_cache_dir() -> Path:
    """systemd's CacheDirectory= ($CACHE_DIRECTORY), else $XDG_CACHE_HOME/inspectd, else ~/.cache/inspectd."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inspectd"


def cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def converter_version(fmt: str, deployable: Deployable | None = None) -> str:
    """The converter packages' versions: part of the cache key, so an upgrade converts again. An exported model's
    own graph: the converter that wrote it (its manifest; the converter need not be installed here)."""
    if deployable is not None and deployable.graph_format == fmt:
        return str(deployable.exported["converter"])  # type: ignore[index]
    packages, extra = EXTRAS[fmt]
    try:
        versions = "-".join(f"{p}{metadata.version(p)}" for p in packages)
        return f"{versions}-opset{ONNX_OPSET}" if fmt == "onnx" else versions
    except metadata.PackageNotFoundError as exc:
        raise UnavailableError(f"converting to {fmt} needs {exc.name}: pip install 'inspectd[{extra}]'") from None


def _saved_model(deployable: Deployable, folder: Path) -> Path:
    out = folder / "saved_model"
    deployable.model.export(str(out), format="tf_saved_model", verbose=False)
    return out


def _to_onnx(saved: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--opset", str(ONNX_OPSET), "--output", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"tf2onnx did not finish converting the model within {CONVERT_TIMEOUT_S} s") from None
    if done.returncode != 0 or not out.is_file():
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise ModelFileError(f"tf2onnx could not convert the model (exit {done.returncode}): {last[0]}")


def _to_openvino(saved: Path, out: Path) -> None:
    from inspectd.model.ovcore import import_openvino

    ov = import_openvino()
    # compress_to_fp16=False: save_model halves the weights by default, which would move the outputs.
    ov.save_model(ov.convert_model(str(saved)), str(out), compress_to_fp16=False)


def _stamp(deployable: Deployable, fmt: str) -> dict:
    return {
        "artifact": EXPORT_FORMAT,
        "source": deployable.path.name,  # the file it came from (its sha256 below is its identity)
        "sha256": deployable.sha256,
        "name": deployable.name,
        "format": fmt,
        "converter": converter_version(fmt),
        "inspectd_version": __version__,
        "input": {"width": deployable.input_size[0], "height": deployable.input_size[1]},
        "meta": deployable.meta,  # what the daemon needs besides the graph: thresholds, mask rule, pooling, cam size
    }


def export(deployable: Deployable, fmt: str, out_dir: Path) -> Path:
    """Convert to `fmt` into the new folder `out_dir` (model file + STAMP); returns the model file."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if deployable.model is None:
        raise ConfigError(f"{deployable.path}: already an exported model; export the .keras file it came from")
    stamp = _stamp(deployable, fmt)  # fails early, with the pip line, when the converter is missing
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / _FILES[fmt]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="inspectd-export-") as tmp:
        saved = _saved_model(deployable, Path(tmp))
        (_to_onnx if fmt == "onnx" else _to_openvino)(saved, target)
    stamp["seconds"] = round(time.monotonic() - t0, 1)
    written = [target, target.with_suffix(".bin")] if fmt == "openvino" else [target]  # the converter's files only
    stamp["files"] = {f.name: file_sha256(f) for f in written}
    (out_dir / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def export_folder(deployable: Deployable, fmt: str, out: Path) -> Path:
    """`inspectd export --out DIR`: the exported model written beside `out` and renamed into place, replacing an
    exported model there (never a folder of anything else); returns the graph file."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / STAMP).is_file())):
        raise UsageError(f"--out {out}: exists and is not an exported model; give a new folder (or an earlier export's)")
    aside = _replace_folder(out, lambda tmp: export(deployable, fmt, tmp), f"--out {out}")
    if aside is not None:  # the user's folder: nothing is left behind to sweep
        shutil.rmtree(aside, ignore_errors=True)
    return out / _FILES[fmt]


def _replace_folder(target: Path, write, what: str) -> Path | None:
    """Fill a temporary folder beside `target` through `write(folder)`, make it readable and rename it to `target`;
    what was there is renamed aside and returned (None: nothing was). OSError -> ConfigError naming `what`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write into {str(target.parent)!r}: {exc.strerror or exc}") from None
    aside = None
    try:
        write(tmp)
        _readable(tmp)
        if target.exists():
            aside = target.with_name(f".old-{target.name}.{time.time_ns()}")
            os.replace(target, aside)
        os.replace(tmp, target)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot store {target.name}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return aside


def cached_export(deployable: Deployable, fmt: str, cache_dir: Path | None = None, refresh: bool = False) -> Path:
    """The model converted to `fmt`, from `cache_dir` (default: `default_cache_dir()`) or converted into it.

    Key: the `.keras` file's sha256 and the converter's version. A conversion is written to a
    temporary folder and renamed into place, so a crash or a second daemon never leaves half a model
    under the key; an entry is complete when its STAMP is there. `refresh`:
    an entry that would not load is moved aside and the model converted again."""
    if deployable.graph is not None:
        return exported_graph(deployable, fmt)
    root = cache_root(cache_dir)
    entry = root / "models" / f"{deployable.sha256[:32]}-{fmt}-{converter_version(fmt)}"
    target = entry / _FILES[fmt]
    try:
        if refresh and entry.exists():
            os.replace(entry, entry.with_name(f".broken-{entry.name}.{time.time_ns()}"))
            log.warning("model %s: the cached %s conversion would not load; converting again", deployable.name, fmt)
        if target.is_file() and (entry / STAMP).is_file():
            log.info("model %s as %s from the cache %s", deployable.name, fmt, entry)
            return target
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        raise ConfigError(
            f"model.cache_dir {str(root)!r}: cannot use it ({exc.strerror or exc}); "
            "set [model] cache_dir or run `inspectd export` where it is writable"
        ) from None
    log.info("converting model %s to %s (once per model; cached in %s)", deployable.name, fmt, root)
    try:
        _convert_into(deployable, fmt, tmp, entry, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted model %s to %s in %s", deployable.name, fmt, entry)
    return target


def exported_graph(deployable: Deployable, fmt: str) -> Path:
    """An exported model's own graph for a runtime that reads `fmt` ("onnx": ONNX Runtime; "openvino": OpenVINO,
    which reads an ONNX graph as well as its own IR)."""
    assert deployable.graph is not None
    if fmt == "onnx" and deployable.graph_format != "onnx":
        raise ConfigError(
            f"model {deployable.name}: {deployable.path} is an OpenVINO model; ONNX Runtime needs an ONNX export "
            "(inspectd export MODEL --runtime onnxruntime --out DIR), or set model.runtime openvino"
        )
    return deployable.graph


def _convert_into(deployable: Deployable, fmt: str, tmp: Path, entry: Path, root: Path) -> None:
    """Convert into `tmp`, then rename it to `entry` unless another process finished first (its entry is kept)."""
    try:
        export(deployable, fmt, tmp)
        _readable(tmp)
    except OSError as exc:  # a full disk, a read-only cache
        raise ConfigError(f"model.cache_dir {str(root)!r}: converting into it failed: {exc.strerror or exc}") from None
    if (entry / STAMP).is_file():
        return
    shutil.rmtree(entry, ignore_errors=True)  # an entry without its stamp
    try:
        os.replace(tmp, entry)
    except OSError:  # another process put its (identical) conversion there in between
        if not (entry / _FILES[fmt]).is_file():
            raise ConfigError(f"model.cache_dir {str(root)!r}: cannot put the conversion in place") from None


def _readable(folder: Path) -> None:
    """mkdtemp makes 0700: the service user must read an entry that `inspectd export` wrote as another user
    (the cache directory itself, 0750 under systemd, keeps everybody else out)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _sweep(models: Path) -> None:
    """Remove temporary folders of conversions killed long ago, and entries moved aside as broken."""
    now = time.time()
    for path in models.iterdir():
        if path.name.startswith(".") and now - path.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(path, ignore_errors=True)


def quantizer_version(fmt: str) -> str:
    """The quantizer `inspectd export --int8` uses for `fmt` and its version (recorded in the entry's stamp)."""
    package = "nncf" if fmt == "openvino" else "onnxruntime"
    try:
        return f"{package}{metadata.version(package)}"
    except metadata.PackageNotFoundError:
        raise UnavailableError(f"INT8 for {fmt} needs {package}: pip install 'inspectd[int8]'") from None


def int8_entry(deployable: Deployable, fmt: str, cache_dir: Path | None) -> Path:
    """The cache folder of the model's calibrated INT8 graph for `fmt` (written by `inspectd export --int8`). The
    quantizer's version is in the stamp, not the key: the daemon runs the INT8 model without NNCF installed."""
    key = f"{deployable.sha256[:32]}-{fmt}-int8-{converter_version(fmt, deployable)}"
    return cache_root(cache_dir) / "models" / key


def cached_int8(deployable: Deployable, fmt: str, cache_dir: Path | None) -> Path:
    """The INT8 model file from the cache, or ConfigError naming the command that makes it."""
    entry = int8_entry(deployable, fmt, cache_dir)
    if not (entry / STAMP).is_file():
        runtime = {"onnx": "onnxruntime", "openvino": "openvino"}[fmt]
        raise ConfigError(
            f"model.precision int8: no calibrated INT8 model of {deployable.name} for {runtime} in {entry.parent}; "
            f"run `inspectd export MODEL --runtime {runtime} --int8` with the same cache_dir"
        )
    return entry / _FILES[fmt]


def store_entry(entry: Path, write) -> Path:
    """Fill a new cache entry through `write(folder)` (which must write STAMP last) in a temporary folder, then
    rename it into place, replacing what was there (the old entry is swept later: a daemon may still read it)."""
    _replace_folder(entry, write, f"model.cache_dir {str(entry.parent)!r}")
    _sweep(entry.parent)
    return entry
