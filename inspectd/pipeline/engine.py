"""Batched single-pass inference: RGB uint8 images of any size -> score and cam_logits per image.

Preprocessing is one function, `preprocess` (uint8 -> float, antialiased bilinear resize to the
model input; the input normalization is inside the model), whatever the runtime. With TensorFlow
it runs with the forward pass in one shape-polymorphic `tf.function` on the device; with ONNX
Runtime or OpenVINO (runtimes.py) it runs as its own `tf.function` on the CPU and the runtime gets
float32 at the model's input size: TensorFlow's antialiased resize (the one training used) has no
ONNX or OpenVINO equivalent (ONNX `Resize` with antialias differs by up to 12 grey levels from
it on noise, OpenVINO ignores the flag; measured), and a frame already at the input size is only
cast. Every function is traced once; batches are padded to a few sizes ("buckets").
The daemon uses `InferenceEngine` directly, the offline tools through `Predictor`.
"""

from __future__ import annotations

__all__ = ["RESIZE", "Prediction", "Predictor", "InferenceEngine", "preprocess", "select_device", "with_policy"]

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from inspectd.errors import ConfigError, InspectdError, ModelFileError
from inspectd.model import export
from inspectd.model.deployable import Deployable, config_nodes
from inspectd.pipeline import runtimes  # modules, not names: their functions are looked up at each call

log = logging.getLogger("inspectd.pipeline.engine")

K = TypeVar("K")  # what `Predictor.stream` carries beside each image

# One resize everywhere (training, infer, evaluate, daemon): bilinear with antialiasing, so a
# model never sees a different interpolation in production than in training.
RESIZE = {"method": "bilinear", "antialias": True}


def preprocess(batch, size: tuple[int, int]):
    """uint8 [n, H, W, 3] -> float32 [n, h, w, 3] 0..255 at `size` (h, w): the model's input, every runtime."""
    import tensorflow as tf

    return tf.image.resize(batch, size, **RESIZE)


@dataclass(frozen=True)
class Prediction:
    score: float
    cam_logits: np.ndarray  # [h, w] float32


def with_policy(model, policy: str):
    """A copy of `model` whose float32 layers compute in `policy` (e.g. mixed_float16), same weights.

    A loaded model keeps the dtype policy saved in its config, so the global Keras policy would not
    apply: the config is rewritten instead (only the DTypePolicy entries change).
    """
    import keras

    config = model.get_config()
    for node in config_nodes(config):
        if node["class_name"] == "DTypePolicy" and node["config"].get("name") == "float32":
            node["config"]["name"] = policy
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def select_device(device: str) -> str:
    """'auto' -> the first GPU when TensorFlow sees one (memory growth on), else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised (a reload): growth was set the first time
            pass
    if device == "cpu" or (device == "auto" and not gpus):
        return "/CPU:0"
    index = 0 if device == "auto" else int(device.split(":")[1])
    if index >= len(gpus):
        raise ConfigError(f"model.device: {device!r} but TensorFlow sees {len(gpus)} GPU(s)")
    return f"/GPU:{index}"


class InferenceEngine:
    """The daemon's model call: uint8 frames -> (score [n], cam_logits [n, h, w]).

    `runtime` tensorflow: one `tf.function` does `preprocess` and the forward pass on the device.
    onnxruntime / openvino: the model converted once (`inspectd.model.export`, cached in
    `cache_dir`) runs in that runtime after `preprocess`; `auto` picks one (`runtime` and
    `runtime_reason` say which and why). TensorFlow's batches are zero-padded to one of a few sizes
    ("buckets", as TF Serving's allowed_batch_sizes), all run at warm-up (the others take any batch
    size as it is); the signatures are shape-polymorphic, so every function is traced once, and
    `traces()` lets tests prove nothing is retraced afterwards.
    """

    def __init__(
        self,
        deployable: Deployable,
        buckets: tuple[int, ...],
        device: str = "auto",
        xla: bool = False,
        precision: str = "float32",
        runtime: str = "tensorflow",
        cache_dir: Path | None = None,
    ):
        import tensorflow as tf

        self.deployable = deployable
        self.buckets = tuple(sorted(buckets))
        self.device = select_device(device)
        self.runtime, self.runtime_reason = runtimes.resolve_runtime(runtime, self.device, precision, xla)
        w, h = deployable.input_size
        self._size = (h, w)
        self._tf = tf
        self._session = None
        if self.runtime != "tensorflow":
            self._session = self._open_exported(cache_dir, fallback=runtime == "auto")
        if self._session is None:
            model = deployable.model if precision == "float32" else with_policy(deployable.model, precision)

            # XLA compiles the model only: the antialiased resize (ScaleAndTranslate) has no XLA kernel.
            @tf.function(jit_compile=xla)
            def forward(x):
                out = model(x, training=False)
                return tf.cast(out["score"], tf.float32), tf.cast(out["cam_logits"], tf.float32)

            @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
            def run(batch):
                return forward(preprocess(batch, (h, w)))

            self._run = run
        else:
            self._run = tf.function(
                lambda batch: preprocess(batch, (h, w)), input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
            )

    def _open_exported(self, cache_dir: Path | None, fallback: bool):
        """The ONNX Runtime / OpenVINO session on the cached export, checked on one frame; None (TensorFlow) if
        `auto` cannot have it. A cached conversion that does not load is converted again, once."""

        try:
            for refresh in (False, True):
                exported = export.cached_export(self.deployable, runtimes.FORMAT_OF[self.runtime], cache_dir, refresh=refresh)
                try:
                    return self._checked(runtimes.open_session(self.runtime, exported, self.device))
                except InspectdError:
                    raise
                except Exception:  # noqa: BLE001 - the runtimes raise their own classes: convert afresh once
                    if refresh:
                        raise
        except Exception as exc:  # noqa: BLE001 - any failure: `auto` runs TensorFlow; a named runtime stops
            if not fallback:
                if isinstance(exc, InspectdError):
                    raise
                raise ModelFileError(
                    f"model.runtime {self.runtime}: cannot run the converted model: {type(exc).__name__}: {exc}"
                ) from None
            log.warning("runtime auto: %s failed (%s); using tensorflow", self.runtime, exc)
            self.runtime, self.runtime_reason = "tensorflow", f"auto: {self.runtime} failed: {exc}"
            return None

    def _checked(self, session):
        """The session, after one frame gave outputs of the deployable model's shapes."""
        h, w = self._size
        scores, cams = session(np.zeros((1, h, w, 3), np.float32))
        cam_h, cam_w = (int(self.deployable.meta["cam"][k]) for k in ("height", "width"))
        if scores.shape != (1,) or cams.shape != (1, cam_h, cam_w):
            raise ValueError(f"outputs {scores.shape} and {cams.shape}, expected (1,) and (1, {cam_h}, {cam_w})")
        return session

    def traces(self) -> int:
        return int(self._run.experimental_get_tracing_count())

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _stack(self, images: list[np.ndarray], size: int) -> np.ndarray:
        """Pad to `size` frames; frames of different sizes are first resized to the model input.

        One copy at most: a single frame that needs no padding goes as a view of itself."""
        if any(im.shape != images[0].shape for im in images):
            images = [preprocess(im, self._size).numpy().round().clip(0, 255).astype(np.uint8) for im in images]
        if size == len(images):
            return images[0][None] if size == 1 else np.stack(images)
        batch = np.zeros((size, *images[0].shape), np.uint8)
        batch[: len(images)] = images
        return batch

    def infer(self, images: list[np.ndarray], interrupt: runtimes.Interrupt | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and cam_logits for up to max(buckets) RGB uint8 frames. `interrupt`: another thread may end the
        call early (ONNX Runtime only; it raises `runtimes.Interrupted`)."""
        if len(images) > self.buckets[-1]:
            raise ValueError(f"{len(images)} frames > largest bucket {self.buckets[-1]}")
        if self._session is not None:  # nothing is traced there, so no padding (a padded frame costs as a real one)
            return self._session(self._model_input(self._stack(images, len(images))), interrupt)
        batch = self._stack(images, self.bucket(len(images)))
        with self._tf.device(self.device):
            scores, cams = self._run(batch)
        return scores.numpy()[: len(images)], cams.numpy()[: len(images)]

    def _model_input(self, batch: np.ndarray) -> np.ndarray:
        """`preprocess` for the exported runtimes, on the CPU; a batch already at the input size is only cast."""
        if batch.shape[1:3] == self._size:
            return batch.astype(np.float32)
        with self._tf.device("/CPU:0"):
            return self._run(batch).numpy()

    def warmup(self, frame_size: tuple[int, int] | None = None) -> None:
        """Trace and run every bucket once (frame_size (w, h) defaults to the model input)."""
        w, h = frame_size or self.deployable.input_size
        for size in self.buckets:
            self.infer([np.zeros((h, w, 3), np.uint8)] * size)
        if self._session is not None and (h, w) == self._size:  # trace the resize too, for cameras of another size
            self._model_input(np.zeros((1, h + 2, w + 2, 3), np.uint8))


class Predictor:
    """The offline tools' view of the engine: any number of images, batch by batch.

    >>> p = Predictor(load_model("demo.keras"), batch_size=4)
    >>> [pred.score for pred in p.predict([image_a, image_b])]
    """

    def __init__(self, deployable: Deployable, batch_size: int = 8):
        self.deployable = deployable
        self.batch_size = batch_size
        # The daemon's engine, so `infer`/`evaluate` preprocess exactly as production does.
        self._engine = InferenceEngine(deployable, (batch_size,))

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict any number of HxWx3 RGB uint8 images (the last batch is zero-padded)."""
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            scores, cams = self._engine.infer(list(images[start : start + self.batch_size]))
            out += [Prediction(float(score), cam) for score, cam in zip(scores, cams)]
        return out

    def stream(self, items: Iterable[tuple[K, np.ndarray]]) -> Iterator[tuple[K, np.ndarray, Prediction]]:
        """(key, image) pairs in, (key, image, prediction) out, batched without holding everything."""
        pending: list[tuple[K, np.ndarray]] = []
        for item in items:
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending):
        preds = self.predict([image for _, image in pending])
        return [(key, image, pred) for (key, image), pred in zip(pending, preds)]
