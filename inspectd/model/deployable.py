"""The deployable model: one Keras model, one forward pass, outputs `score` [B] and `cam_logits` [B, h, w].

`cam_logits = F . w + b` (a 1x1 convolution carrying the classifier's Dense weights), so
`mean(cam_logits)` is exactly the classifier's logit and `sigmoid(cam_logits)` is a per-location
defect probability. The file is a standard `.keras` archive plus an `inspectd.json` entry with the
metadata; loading always uses Keras' safe mode. This module is on the daemon's path: it imports
no training-only packages, and Keras only for a `.keras` file.

An exported model (`inspectd export --out DIR`, and every entry of the conversion cache) is a
folder: the ONNX or OpenVINO graph and `inspectd-export.json` (EXPORT_MANIFEST) with the source
model's metadata, its sha256 and the graph files' sha256. It loads without TensorFlow or Keras
(`Deployable.model` is None, `graph` the file a runtime opens) and carries the source's identity:
events, gates and caches name the `.keras` model it came from.
"""

from __future__ import annotations

__all__ = [
    "FORMAT",
    "INPUT_RANGES",
    "Head",
    "Deployable",
    "find_head",
    "build_deployable",
    "save_model",
    "load_model",
    "read_metadata",
    "file_sha256",
    "config_nodes",
    "BUILTIN_DEMO_MODEL",
    "resolve_model_path",
    "EXPORT_FORMAT",
    "EXPORT_MANIFEST",
    "model_sha256",
    "model_revision",
    "keras_missing",
    "read_manifest",
    "load_exported",
]

import hashlib
import importlib.util
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from inspectd import __version__
from inspectd.errors import ModelFileError, NoInputError, UnavailableError, UsageError
from inspectd.model.head import Pooling, cam_head, deployable_outputs, register
from inspectd.model.masks import MaskRule

FORMAT = "inspectd.model/1"
BUILTIN_DEMO_MODEL = "builtin:demo"  # the bundled demo model, as [model] path and the commands name it
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
META_ENTRY = "inspectd.json"
EXPORT_FORMAT = "inspectd.exported/1"  # an exported model folder's manifest (`artifact`)
EXPORT_MANIFEST = "inspectd-export.json"  # written last: a folder with it is complete
# What the wrapped classifier expects -> (scale, offset) applied to 0..255 input.
INPUT_RANGES = {"0-255": None, "0-1": (1 / 255.0, 0.0), "-1-1": (1 / 127.5, -1.0)}


@dataclass(frozen=True)
class Head:
    """The classifier's GAP -> Dense head, reduced to one logit: F [B,h,w,C] and w [C], b."""

    features: Any  # KerasTensor feeding GlobalAveragePooling2D
    weight: np.ndarray
    bias: float


@dataclass(frozen=True)
class Deployable:
    model: Any  # keras.Model with outputs {"score", "cam_logits"}; None for an exported model
    meta: dict
    path: Path
    sha256: str  # of the .keras file (an exported model: of the file it was exported from)
    graph: Path | None = None  # an exported model's graph file (model.onnx or model.xml)
    exported: dict | None = None  # an exported model's manifest

    @property
    def revision(self) -> str:
        """The file's own version (reload's change detection): the sha256 for a .keras file, the manifest's for an
        exported folder (`sha256` stays the source's: the model's identity)."""
        return self.sha256 if self.exported is None else "export:" + str(self.exported["manifest_sha256"])

    @property
    def graph_format(self) -> str | None:
        """ "onnx" or "openvino" for an exported model, None for a .keras one."""
        return None if self.exported is None else str(self.exported["format"])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.meta["input"]["width"]), int(self.meta["input"]["height"])

    @property
    def threshold(self) -> float:
        return float(self.meta["thresholds"]["score"])

    @property
    def mask_threshold(self) -> float:
        return float(self.meta["thresholds"]["mask"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.stem)

    @property
    def mask_rule(self):
        """The model's own rule for turning its map into a mask (models without one: a fixed probability)."""
        rule = self.meta.get("mask_rule")
        return MaskRule(rule["kind"], float(rule["param"])) if rule else MaskRule("probability", self.mask_threshold)

    @property
    def pooling(self) -> Pooling:
        """How the model pools cam_logits into its score's logit (applied inside the model)."""
        return Pooling.from_meta(self.meta.get("pooling"))


def config_nodes(node) -> Iterator[dict]:
    """Every `{"class_name": ..., "config": ...}` object in a Keras config tree (layers, dtype policies,
    initializers), depth first; callers may edit the yielded dicts in place."""
    if isinstance(node, dict):
        if "class_name" in node and "config" in node:
            yield node
        for value in node.values():
            yield from config_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from config_nodes(value)


def _producer(tensor):
    # Keras 3 keeps the layer that produced a symbolic tensor in `_keras_history`; there is no
    # public accessor for walking a functional graph backwards.
    return tensor._keras_history[0]


def _dense_logit(dense, activation: str) -> tuple[np.ndarray, float]:
    kernel = np.asarray(dense.kernel)
    bias = np.asarray(dense.bias) if dense.use_bias else np.zeros(dense.units)
    if dense.units == 1 and activation in ("sigmoid", "linear"):
        return kernel[:, 0], float(bias[0])
    if dense.units == 2 and activation == "softmax":
        # softmax over two classes == sigmoid of the logit difference: the CAM stays exact.
        return kernel[:, 1] - kernel[:, 0], float(bias[1] - bias[0])
    raise ModelFileError(
        f"classifier head is Dense({dense.units}, {activation}); expected Dense(1, sigmoid) "
        "(or Dense(2, softmax)) after GlobalAveragePooling2D"
    )


def find_head(classifier) -> Head:
    """Locate `F -> GlobalAveragePooling2D -> [Dropout] -> Dense` at the classifier's output."""
    import keras

    if len(classifier.outputs) != 1:
        raise ModelFileError(f"classifier has {len(classifier.outputs)} outputs; expected one score")
    layer = _producer(classifier.outputs[0])
    activation = None
    if isinstance(layer, keras.layers.Activation):
        activation = keras.activations.serialize(layer.activation)
        layer = _producer(layer.input)
    if not isinstance(layer, keras.layers.Dense):
        raise ModelFileError(
            f"classifier output comes from {type(layer).__name__} {layer.name!r}; expected "
            "GlobalAveragePooling2D -> Dense(1, sigmoid) as in the reference method"
        )
    act = activation or keras.activations.serialize(layer.activation)
    act = act if isinstance(act, str) else act.get("config", {}).get("name", str(act))
    weight, bias = _dense_logit(layer, act)
    pool = _producer(layer.input)
    while isinstance(pool, keras.layers.Dropout):
        pool = _producer(pool.input)
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        raise ModelFileError(
            f"the Dense head is fed by {type(pool).__name__} {pool.name!r}; a CAM needs GlobalAveragePooling2D directly before it"
        )
    return Head(pool.input, weight.astype(np.float32), bias)


def build_deployable(classifier, input_range: str = "0-255"):
    """Wrap a GAP+Dense classifier into the two-output model (shares the classifier's weights)."""
    import keras

    head = find_head(classifier)
    shape = tuple(classifier.inputs[0].shape[1:])
    if len(shape) != 3 or None in shape or shape[2] != 3:
        raise ModelFileError(
            f"classifier input shape {shape}: expected a fixed (height, width, 3) input; rebuild it with a fixed input_shape"
        )
    features = keras.Model(classifier.inputs, head.features, name="features")
    image = keras.Input(shape, name="image")
    x = image
    rescale = INPUT_RANGES[input_range]
    if rescale is not None:
        scale, offset = rescale
        x = keras.layers.Rescaling(scale, offset, name="input_range")(x)
    fmap = features(x)
    channels = fmap.shape[-1]
    cam, score = cam_head(fmap, Pooling("gap"))  # GAP -> Dense == Dense (1x1 conv) -> GAP: exact
    model = keras.Model(image, deployable_outputs(cam, score), name="inspectd_cam")
    model.get_layer("cam").set_weights([head.weight.reshape(1, 1, channels, 1), np.array([head.bias], np.float32)])
    return model


def resolve_model_path(path: str) -> Path:
    """'builtin:demo' -> the bundled demo model (its .keras file; without Keras installed, its ONNX export, the
    same model); anything else is a file or exported folder path (~ expanded)."""
    if path == BUILTIN_DEMO_MODEL:
        return _ASSETS / "demo.keras" if importlib.util.find_spec("keras") is not None else _ASSETS / "demo-onnx"
    return Path(os.path.expanduser(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model, path: Path, meta: dict) -> Path:
    """Write the model and its metadata atomically (a half-written model never replaces a good one)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise UsageError(f"--out {path}: the model file name must end in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    _, h, w, _ = model.inputs[0].shape
    cam_h, cam_w = model.get_layer("cam_logits").output.shape[1:]
    meta = {
        "format": FORMAT,
        "inspectd_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "thresholds": {"score": 0.5, "mask": 0.5},
        **meta,
        # Derived from the model itself, so the metadata cannot disagree with the graph.
        "input": {
            "width": int(w),
            "height": int(h),
            "channels": 3,
            "channel_order": "RGB",
            "range": "0-255",
            "preprocessing": "inside the model: feed RGB 0..255 float",
        },
        "stride": int(h // cam_h),
        "cam": {"height": int(cam_h), "width": int(cam_w)},
    }
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(META_ENTRY, json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: Path) -> dict:
    """The metadata alone, without TensorFlow (cheap: for `inspectd` tools and the daemon)."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)["meta"]
    if not path.exists():
        raise NoInputError(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file, not a model file")
    if not os.access(path, os.R_OK):
        raise NoInputError(f"{path}: cannot read the model file: permission denied")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not an inspectd model (not a .keras archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            if META_ENTRY not in archive.namelist():
                raise ModelFileError(
                    f"{path}: a Keras model but not an inspectd deployable model (no {META_ENTRY}); "
                    "turn a classifier into one with `inspectd convert`"
                )
            meta = json.loads(archive.read(META_ENTRY))
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:  # truncated or corrupt archive or metadata
        raise ModelFileError(f"{path}: damaged model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise ModelFileError(f"{path}: model format {meta.get('format')!r}, this inspectd reads {FORMAT!r}")
    _check_metadata(path, meta)
    return meta


def _check_metadata(path: Path, meta: dict) -> None:
    """The fields every tool reads, checked once when the file is read: a wrong value is one
    ModelFileError naming it, not a KeyError deep inside the daemon or a mask rule out of range."""

    def section(key: str) -> dict:
        value = meta[key]
        if not isinstance(value, dict):
            raise ValueError(f"{key} is {type(value).__name__}, not an object")
        return value

    def optional(key: str) -> dict | None:
        return section(key) if meta.get(key) is not None else None

    try:
        size = section("input")["width"], section("input")["height"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise ValueError(f"input size {size[0]}x{size[1]} is not two positive integers")
        for key in ("score", "mask"):
            value = section("thresholds")[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds.{key} {value!r} is not a number in [0, 1]")
        Pooling.from_meta(optional("pooling"))
        rule = optional("mask_rule")
        if rule is not None:
            MaskRule(str(rule["kind"]), float(rule["param"]))
    except KeyError as exc:
        raise ModelFileError(f"{path}: bad inspectd metadata: {exc.args[0]!r} missing") from None
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: bad inspectd metadata: {exc}") from None


def read_manifest(folder: Path) -> dict:
    """An exported model folder's manifest, its metadata checked as a .keras file's; ModelFileError otherwise."""
    manifest = folder / EXPORT_MANIFEST
    if not manifest.is_file():
        raise ModelFileError(
            f"{folder}: is a folder, not a model file (a SavedModel folder? turn it into a deployable model with "
            f"`inspectd convert`; an exported model folder holds {EXPORT_MANIFEST})"
        )
    if not os.access(manifest, os.R_OK):
        raise NoInputError(f"{manifest}: cannot read it: permission denied")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{manifest}: damaged ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("artifact") != EXPORT_FORMAT or not isinstance(data.get("meta"), dict):
        raise ModelFileError(
            f"{folder}: not an exported inspectd model (a cache entry of another kind, or written by an older "
            f"inspectd: export it again with `inspectd export MODEL --runtime R --out {folder}`)"
        )
    if data.get("format") not in ("onnx", "openvino") or not isinstance(data.get("files"), dict) or not data["files"]:
        raise ModelFileError(f"{manifest}: bad manifest: format {data.get('format')!r}, files {data.get('files')!r}")
    if not isinstance(data.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", data["sha256"]):
        raise ModelFileError(f"{manifest}: bad manifest: sha256 {data.get('sha256')!r} is not a SHA-256 in hex")
    if not isinstance(data.get("converter"), str) or not data["converter"]:
        raise ModelFileError(f"{manifest}: bad manifest: converter {data.get('converter')!r}")
    if data["meta"].get("format") != FORMAT:
        raise ModelFileError(f"{folder}: model format {data['meta'].get('format')!r}, this inspectd reads {FORMAT!r}")
    _check_metadata(folder, data["meta"])
    cam = data["meta"].get("cam")
    if not isinstance(cam, dict) or not all(isinstance(cam.get(k), int) and cam[k] > 0 for k in ("height", "width")):
        raise ModelFileError(f"{manifest}: bad inspectd metadata: cam {cam!r} is not a positive height and width")
    return data


def load_exported(folder: Path) -> Deployable:
    """An exported model folder, its graph files checked against the manifest's sha256 (a graph copied halfway or
    replaced is refused here, not half-run). Imports no TensorFlow, Keras or runtime."""
    data = read_manifest(folder)
    for name, digest in data["files"].items():
        file = folder / name
        if not file.is_file():
            raise ModelFileError(f"{folder}: the graph file {name} named by {EXPORT_MANIFEST} is missing")
        if file_sha256(file) != digest:
            raise ModelFileError(f"{file}: its sha256 differs from {EXPORT_MANIFEST}'s: damaged or replaced; export again")
    graph = folder / ("model.onnx" if data["format"] == "onnx" else "model.xml")
    if graph.name not in data["files"]:
        raise ModelFileError(f"{folder}: {EXPORT_MANIFEST} does not name {graph.name}")
    data["manifest_sha256"] = file_sha256(folder / EXPORT_MANIFEST)
    return Deployable(None, data["meta"], folder, str(data["sha256"]), graph, data)


def model_sha256(path: Path) -> str:
    """A model's identity as `Deployable.sha256` has it: a .keras file's own sha256, an exported folder's source's."""
    path = Path(path)
    if path.is_dir():
        return str(read_manifest(path)["sha256"])
    return file_sha256(path)


def model_revision(path: Path) -> str:
    """What changes when the file or folder does (`Deployable.revision`): a .keras file's sha256; an exported
    folder's manifest's, which names its graph files' sha256 (a new export of the same model into it is new)."""
    path = Path(path)
    if path.is_dir():
        read_manifest(path)
        return "export:" + file_sha256(path / EXPORT_MANIFEST)
    return file_sha256(path)


def keras_missing(path: Path) -> UnavailableError:
    """The one-line error for a .keras model on an install without Keras (exit 69), naming both ways out."""
    return UnavailableError(
        f"{path}: a .keras model needs TensorFlow to run (pip install 'inspectd[tensorflow]'); this install runs "
        "exported models: `inspectd export MODEL --runtime onnxruntime --out DIR` where TensorFlow is, then "
        "model.path = DIR"
    )


def load_model(path: Path) -> Deployable:
    """Load a deployable model: a .keras file in Keras safe mode (a model file can never run code), or an exported
    model folder without Keras."""
    path = Path(path)
    if path.is_dir():
        return load_exported(path)
    meta = read_metadata(path)
    if importlib.util.find_spec("keras") is None:
        raise keras_missing(path)
    from inspectd.tfload import import_tensorflow

    import_tensorflow()  # quietly, and before GStreamer (inspectd.sources.gstreamer)
    import keras

    register()  # the pooling layers of inspectd's own (registered, safe-mode loadable)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: cannot load the model safely: {first}") from None
    return Deployable(model, meta, path, file_sha256(path))
