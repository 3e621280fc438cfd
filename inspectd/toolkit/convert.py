"""`inspectd convert`: a plain GAP+Dense classifier -> the deployable two-output model.

Reads `.keras` (Keras 3), `.h5`/`.hdf5` (including Keras 2 files such as the reference notebook's
`model.save('x.hdf5')` under TensorFlow 2.12) and TensorFlow SavedModel folders written by Keras 2
(these need the `tf-keras` package). No format is allowed to run code: Lambda layers are refused.
"""

from __future__ import annotations

__all__ = ["load_classifier", "convert"]

import json
import tempfile
from pathlib import Path

from inspectd.errors import DataError, ModelFileError, NoInputError, UsageError
from inspectd.model.deployable import INPUT_RANGES, build_deployable, config_nodes, save_model

# Layers whose config is a Python function: loading one would execute code from the file.
_CODE_LAYERS = {"Lambda"}


def _clean_keras2(config) -> set[str]:
    """Remove what Keras 3 rejects from a Keras 2 config, in place; returns the class names seen."""
    found: set[str] = set()
    for node in config_nodes(config):
        found.add(node["class_name"])
        if node["class_name"] == "DepthwiseConv2D" and isinstance(node["config"], dict):
            # Keras 2 wrote `groups` for DepthwiseConv2D; Keras 3 rejects the key (it never
            # meant anything for depthwise convolutions).
            node["config"].pop("groups", None)
    return found


def _refuse_code(path: Path, classes: set[str]) -> None:
    unsafe = sorted(classes & _CODE_LAYERS)
    if unsafe:
        raise ModelFileError(
            f"{path}: contains a {unsafe[0]} layer (arbitrary Python code); refused for safety. "
            "Rebuild the classifier without Lambda layers"
        )


def _load_h5(path: Path):
    import h5py

    # The public loader cannot read Keras 2 files that carry keys Keras 3 dropped; this is the same
    # legacy path with the config cleaned first.
    from keras.src.legacy.saving import legacy_h5_format, saving_utils

    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs:
            raise ModelFileError(f"{path}: an HDF5 file without a model config (weights only?)")
        config = json.loads(f.attrs["model_config"])
        _refuse_code(path, _clean_keras2(config))
        model = saving_utils.model_from_config(config)
        legacy_h5_format.load_weights_from_hdf5_group(f["model_weights"], model)
    return model


def _load_savedmodel(path: Path):
    try:
        import tf_keras
    except ImportError:
        raise UsageError(
            f"{path}: a SavedModel; reading Keras-2 SavedModels needs the tf-keras package "
            "(pip install tf-keras), or save the classifier as .h5/.keras"
        ) from None
    meta = path / "keras_metadata.pb"
    if not meta.is_file():
        raise ModelFileError(f"{path}: a SavedModel without Keras metadata; cannot find its layers")
    if b'"class_name": "Lambda"' in meta.read_bytes():
        _refuse_code(path, {"Lambda"})
    model = tf_keras.models.load_model(path, compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        h5 = Path(tmp) / "classifier.h5"
        model.save(h5, save_format="h5")
        return _load_h5(h5)


def load_classifier(path: Path):
    """Load a plain classifier from .keras, .h5/.hdf5 or a SavedModel folder, refusing code."""
    import keras

    path = Path(path)
    if not path.exists():
        raise NoInputError(f"{path}: no such classifier file or SavedModel folder")
    if path.is_dir():
        return _load_savedmodel(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            return _load_h5(path)
        if suffix == ".keras":
            return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ModelFileError, UsageError):
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelFileError(f"{path}: cannot load this classifier: {first}") from None
    raise DataError(f"{path}: unknown model format {suffix!r}; expected .keras, .h5, .hdf5 or a SavedModel folder")


def _guess_backbone(classifier) -> str:
    names = {layer.name for layer in classifier._flatten_layers()}
    for marker, backbone in (
        ("block6a_expand_activation", "efficientnetv2b0"),
        ("convnext_tiny_stem", "convnext_tiny"),
        ("expanded_conv_12_expand", "mobilenetv3large"),
    ):
        if marker in names:
            return backbone
    return "unknown"


def convert(
    classifier_path: Path,
    out: Path,
    input_range: str = "0-255",
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> Path:
    """Write the deployable model for a classifier file; returns the output path."""
    if input_range not in INPUT_RANGES:
        raise UsageError(f"--input-range {input_range}: choose one of {', '.join(INPUT_RANGES)}")
    classifier = load_classifier(classifier_path)
    model = build_deployable(classifier, input_range)
    meta = {
        "name": Path(out).stem,
        "source": {"kind": "convert", "classifier": Path(classifier_path).name, "classifier_input_range": input_range},
        "backbone": _guess_backbone(classifier),
        "thresholds": {"score": threshold, "mask": mask_threshold},
        "training": None,
        "metrics": None,
    }
    return save_model(model, out, meta)
