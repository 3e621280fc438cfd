"""Batched single-pass inference: RGB uint8 images of any size -> score and cam_logits per image.

Preprocessing (uint8 -> float, resize to the model input) and the forward pass run in one
shape-polymorphic `tf.function`, traced once; batches are padded to a few sizes ("buckets").
The daemon uses `InferenceEngine` directly, the offline tools through `Predictor`.
"""

from __future__ import annotations

__all__ = ["RESIZE", "Prediction", "Predictor", "InferenceEngine", "select_device", "with_policy"]

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from inspectd.model.deployable import Deployable, config_nodes

# One resize everywhere (training, infer, evaluate, daemon): bilinear with antialiasing, so a
# model never sees a different interpolation in production than in training.
RESIZE = {"method": "bilinear", "antialias": True}


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
        from inspectd.errors import ConfigError

        raise ConfigError(f"model.device: {device!r} but TensorFlow sees {len(gpus)} GPU(s)")
    return f"/GPU:{index}"


class InferenceEngine:
    """The daemon's model call: uint8 frames -> (score [n], cam_logits [n, h, w]).

    One `tf.function` does uint8 -> float, the resize to the model input and the forward pass on
    the device. Batches are zero-padded to one of a few sizes ("buckets", as TF Serving's
    allowed_batch_sizes), all run at warm-up; the signature is shape-polymorphic, so the function is
    traced once, and `traces()` lets tests prove nothing is retraced afterwards.
    """

    def __init__(self, deployable: Deployable, buckets: tuple[int, ...], device: str = "auto", xla: bool = False,
                 precision: str = "float32"):
        import tensorflow as tf

        self.deployable = deployable
        self.buckets = tuple(sorted(buckets))
        self.device = select_device(device)
        w, h = deployable.input_size
        self._size = (h, w)
        model = deployable.model if precision == "float32" else with_policy(deployable.model, precision)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], jit_compile=xla)
        def run(batch):
            x = tf.image.resize(batch, (h, w), **RESIZE)
            out = model(x, training=False)
            return tf.cast(out["score"], tf.float32), tf.cast(out["cam_logits"], tf.float32)

        self._run = run
        self._tf = tf

    def traces(self) -> int:
        return int(self._run.experimental_get_tracing_count())

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _stack(self, images: list[np.ndarray], size: int) -> np.ndarray:
        """Pad to `size` frames; frames of different sizes are first resized to the model input."""
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            images = [self._tf.image.resize(im, self._size, **RESIZE).numpy().round().clip(0, 255).astype(np.uint8)
                      for im in images]
        batch = np.zeros((size, *images[0].shape), np.uint8)
        batch[: len(images)] = images
        return batch

    def infer(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and cam_logits for up to max(buckets) RGB uint8 frames."""
        if len(images) > self.buckets[-1]:
            raise ValueError(f"{len(images)} frames > largest bucket {self.buckets[-1]}")
        batch = self._stack(images, self.bucket(len(images)))
        with self._tf.device(self.device):
            scores, cams = self._run(batch)
        return scores.numpy()[: len(images)], cams.numpy()[: len(images)]

    def warmup(self, frame_size: tuple[int, int] | None = None) -> None:
        """Trace and run every bucket once (frame_size (w, h) defaults to the model input)."""
        w, h = frame_size or self.deployable.input_size
        for size in self.buckets:
            self.infer([np.zeros((h, w, 3), np.uint8)] * size)


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
            scores, cams = self._engine.infer(list(images[start:start + self.batch_size]))
            out += [Prediction(float(score), cam) for score, cam in zip(scores, cams)]
        return out

    def stream(self, items: Iterable) -> Iterator[tuple[object, np.ndarray, Prediction]]:
        """(key, image) pairs in, (key, image, prediction) out, batched without holding everything."""
        pending: list[tuple[object, np.ndarray]] = []
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
