"""The CAM head: a 1x1 convolution makes the per-location logit map, a pooling makes the image logit.

    score = sigmoid(pool(cam_logits))            # one forward pass, the pooling inside the model

`pool` is recorded in the model's metadata (`{"kind": ..., "param": ...}`) and built from layers
that load in Keras' safe mode. Each is exact: `pool_numpy(cam_logits)` recomputes the image logit
from the published map (a test holds every pooling to 1e-5).

- `gap`: the mean (the paper; every converted classifier). A small defect must lift the whole map.
- `lse:r`: log-mean-exp with sharpness r, (1/r) log mean exp(r x): the mean at r -> 0, the max at
  r -> inf (Pinheiro & Collobert 2015). Standard layers only (log_softmax does the stable part).
- `topk:f`: the mean of the top f share of cells (multiple-instance learning; f=1 is gap).
- `max`: the largest cell (global max pooling).
"""

from __future__ import annotations

__all__ = [
    "Pooling",
    "POOLING_KINDS",
    "parse_pooling",
    "pool_logit",
    "pool_numpy",
    "cam_head",
    "deployable_outputs",
    "location_affine",
    "location_whiten",
    "register",
]

import math
from dataclasses import dataclass
from typing import cast

import numpy as np

POOLING_KINDS = ("gap", "lse", "topk", "max")
_DEFAULT_PARAM = {"gap": None, "lse": 5.0, "topk": 0.1, "max": None}


@dataclass(frozen=True)
class Pooling:
    kind: str = "gap"
    param: float | None = None

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    def as_meta(self) -> dict:
        return {"kind": self.kind, "param": self.param}

    @classmethod
    def from_meta(cls, meta: dict | None) -> Pooling:
        """The metadata's pooling; models from before poolings existed are `gap`. ValueError when it is not one."""
        if not meta:
            return cls()
        kind, param = meta.get("kind", "gap"), meta.get("param")
        return parse_pooling(str(kind) if param is None else f"{kind}:{float(param)!r}")


def parse_pooling(text: str) -> Pooling:
    """'gap' | 'max' | 'lse' | 'lse:R' (R > 0) | 'topk' | 'topk:F' (0 < F <= 1) -> Pooling; ValueError otherwise."""
    kind, _, value = text.strip().lower().partition(":")
    if kind not in POOLING_KINDS:
        raise ValueError(f"pooling {text!r}: choose one of {', '.join(POOLING_KINDS)} (lse:R, topk:F with a parameter)")
    default = _DEFAULT_PARAM[kind]
    if default is None:
        if value:
            raise ValueError(f"pooling {text!r}: {kind} takes no parameter")
        return Pooling(kind)
    param = float(value) if value else default
    if not (param > 0 and math.isfinite(param)) or (kind == "topk" and param > 1):
        raise ValueError(f"pooling {text!r}: the parameter must be > 0" + (" and <= 1" if kind == "topk" else ""))
    return Pooling(kind, param)


def _param(pooling: Pooling) -> float:
    """The parameter of a `lse` or `topk` pooling (parse_pooling gives each one)."""
    return cast(float, pooling.param)


def _topk_count(fraction: float, cells: int) -> int:
    return max(1, min(cells, int(round(fraction * cells))))


def _topk_layer():
    import keras

    @keras.saving.register_keras_serializable(package="inspectd")
    class TopKMean(keras.layers.Layer):
        """Mean of the k largest values of each map [B, h, w, 1] -> [B, 1] (keras.ops.top_k)."""

        def __init__(self, k: int, **kwargs):
            super().__init__(**kwargs)
            self.k = int(k)

        def call(self, x):
            flat = keras.ops.reshape(x, (-1, x.shape[1] * x.shape[2]))
            top, _ = keras.ops.top_k(flat, self.k, sorted=False)
            return keras.ops.mean(top, axis=-1, keepdims=True)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], 1)

        def get_config(self):
            return {**super().get_config(), "k": self.k}

    return TopKMean


def _location_affine_layer():
    import keras

    @keras.saving.register_keras_serializable(package="inspectd")
    class LocationAffine(keras.layers.Layer):
        """x [B, h, w, 1] -> x * scale[h, w] + offset[h, w]: a scale and an offset of its own at every location.
        The first ok-only models (a Gaussian shared by all locations) standardised their distance map with it;
        kept so that their files still load. The two maps are weights, set after building."""

        def build(self, input_shape):
            h, w = int(input_shape[1]), int(input_shape[2])
            self.scale = self.add_weight(shape=(h, w, 1), initializer="ones", trainable=False, name="scale")
            self.offset = self.add_weight(shape=(h, w, 1), initializer="zeros", trainable=False, name="offset")

        def call(self, x):
            return x * self.scale + self.offset

    return LocationAffine


def _location_whiten_layer():
    import keras

    @keras.saving.register_keras_serializable(package="inspectd")
    class LocationWhiten(keras.layers.Layer):
        """x [B, h, w, C] -> z[b, i, j] = kernel[i, j] @ x[b, i, j] + bias[i, j]: a C x C matrix and an offset of
        its own at every location (an ok-only model's per-location Gaussian, inspectd.toolkit.okonly: z is the
        whitened feature, |z|^2 the Mahalanobis distance). Weights set after building; one einsum, which
        TensorFlow, ONNX (Einsum) and OpenVINO all run. `storage` float16 keeps the matrices at half the bytes
        (most of an ok-only model file) and computes in float32; files without it are float32."""

        def __init__(self, storage: str = "float32", **kwargs):
            super().__init__(**kwargs)
            if storage not in ("float32", "float16"):
                raise ValueError(f"LocationWhiten storage {storage!r}: float32 or float16")
            self.storage = storage

        def build(self, input_shape):
            h, w, c = (int(v) for v in input_shape[1:])
            self.kernel = self.add_weight(
                shape=(h, w, c, c), initializer="zeros", trainable=False, name="kernel", dtype=self.storage
            )
            self.bias = self.add_weight(shape=(h, w, c), initializer="zeros", trainable=False, name="bias")

        def call(self, x):
            kernel = self.kernel if self.storage == "float32" else keras.ops.cast(self.kernel, "float32")
            return keras.ops.einsum("bhwd,hwcd->bhwc", x, kernel) + self.bias

        def get_config(self):
            return {**super().get_config(), "storage": self.storage}

    return LocationWhiten


# The Keras classes, made on first use: this module imports without Keras (the daemon's metadata path).
_TOPK: list[type] = []
_AFFINE: list[type] = []
_WHITEN: list[type] = []


def register():
    """Make inspectd's custom layers known to Keras (before loading a model that uses them); returns TopKMean."""
    if not _TOPK:
        _TOPK.append(_topk_layer())
    location_affine()
    location_whiten()
    return _TOPK[0]


def location_affine():
    """The LocationAffine layer class (registered with Keras on first use)."""
    if not _AFFINE:
        _AFFINE.append(_location_affine_layer())
    return _AFFINE[0]


def location_whiten():
    """The LocationWhiten layer class (registered with Keras on first use)."""
    if not _WHITEN:
        _WHITEN.append(_location_whiten_layer())
    return _WHITEN[0]


def pool_logit(cam, pooling: Pooling):
    """Keras graph: cam logits [B, h, w, 1] -> image logit [B, 1], named `logit`."""
    import keras

    h, w = int(cam.shape[1]), int(cam.shape[2])
    if pooling.kind == "gap":
        return keras.layers.GlobalAveragePooling2D(name="logit")(cam)
    if pooling.kind == "max":
        return keras.layers.GlobalMaxPooling2D(name="logit")(cam)
    if pooling.kind == "topk":
        return register()(_topk_count(_param(pooling), h * w), name="logit")(cam)
    # lse: (1/r) * (logsumexp(r x) - log n); logsumexp(z) = z_i - log_softmax(z)_i for every i, so its
    # mean over i is exact and stable, with standard layers only.
    r, n = float(_param(pooling)), h * w
    z = keras.layers.Rescaling(r, name="lse_scale")(keras.layers.Reshape((1, n), name="lse_flat")(cam))
    lse = keras.layers.Subtract(name="lse_terms")([z, keras.layers.Activation("log_softmax", name="lse_log_softmax")(z)])
    mean = keras.layers.GlobalAveragePooling1D(data_format="channels_first", name="lse_mean")(lse)
    return keras.layers.Rescaling(1.0 / r, offset=-math.log(n) / r, name="logit")(mean)


def cam_head(fmap, pooling: Pooling, hidden: int = 0, bias: float = 0.0):
    """Feature map [B, h, w, C] -> (cam logits [B, h, w, 1], score [B, 1]): the 1x1 convolution and the pooling.

    `hidden` > 0 puts a normalisation and a 1x1 convolution of that many ReLU units before it (the hypercolumn
    head: stages of very different scales side by side, and a per-pixel decision a linear map cannot make;
    still one pass, and still `cam_logits` from the last convolution). `bias` starts the map there (the
    hypercolumn head starts at a rare defect pixel's prior, as RetinaNet starts its classifier)."""
    import keras

    if hidden:
        fmap = keras.layers.BatchNormalization(name="cam_norm")(fmap)
        fmap = keras.layers.Conv2D(hidden, 1, activation="relu", name="cam_hidden")(fmap)
    init = keras.initializers.Constant(bias)
    cam = keras.layers.Conv2D(1, 1, bias_initializer=init, name="cam", dtype="float32")(fmap)
    score = keras.layers.Activation("sigmoid", name="prob", dtype="float32")(pool_logit(cam, pooling))
    return cam, score


def deployable_outputs(cam, score) -> dict:
    """The deployable model's outputs from the head's tensors: score [B], cam_logits [B, h, w]."""
    import keras

    h, w = int(cam.shape[1]), int(cam.shape[2])
    return {
        "score": keras.layers.Reshape((), name="score")(score),
        "cam_logits": keras.layers.Reshape((h, w), name="cam_logits")(cam),
    }


def pool_numpy(cam_logits: np.ndarray, pooling: Pooling) -> float:
    """The image logit from a [h, w] map, in float64: what the model's own pooling computes."""
    x = np.asarray(cam_logits, np.float64).ravel()
    if pooling.kind == "gap":
        return float(x.mean())
    if pooling.kind == "max":
        return float(x.max())
    if pooling.kind == "topk":
        return float(np.sort(x)[-_topk_count(_param(pooling), x.size) :].mean())
    r = float(_param(pooling))
    m = x.max()
    return float(m + np.log(np.mean(np.exp(r * (x - m)))) / r)
