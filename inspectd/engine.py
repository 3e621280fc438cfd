"""Batched single-pass inference: RGB uint8 images of any size -> score and cam_logits per image.

Preprocessing (resize to the model input, uint8 -> float) and the forward pass run in one
`tf.function` with a fixed batch shape, so the graph is traced once per batch size.
"""

from __future__ import annotations

__all__ = ["RESIZE", "Prediction", "Predictor"]

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from inspectd.model.deployable import Deployable

# One resize everywhere (training, infer, evaluate, daemon): bilinear with antialiasing, so a
# model never sees a different interpolation in production than in training.
RESIZE = {"method": "bilinear", "antialias": True}


@dataclass(frozen=True)
class Prediction:
    score: float
    cam_logits: np.ndarray  # [h, w] float32


class Predictor:
    """Runs a deployable model on batches of images.

    >>> p = Predictor(load_model("demo.keras"), batch_size=4)
    >>> [pred.score for pred in p.predict([image_a, image_b])]
    """

    def __init__(self, deployable: Deployable, batch_size: int = 8):
        import tensorflow as tf

        self.deployable = deployable
        self.batch_size = batch_size
        w, h = deployable.input_size
        model = deployable.model

        @tf.function(input_signature=[tf.TensorSpec([batch_size, h, w, 3], tf.float32)])
        def forward(batch):
            out = model(batch, training=False)
            return out["score"], out["cam_logits"]

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)], reduce_retracing=True)
        def resize(image):
            return tf.image.resize(image, (h, w), **RESIZE)

        self._forward = forward
        self._resize = resize
        self.traces = 0

    def _prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.zeros((self.batch_size, *self.deployable.model.inputs[0].shape[1:]), np.float32)
        for i, image in enumerate(images):
            batch[i] = self._resize(image).numpy()
        return batch

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict any number of HxWx3 RGB uint8 images, batch by batch (last batch zero-padded)."""
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            scores, cams = self._forward(self._prepare(chunk))
            scores, cams = scores.numpy(), cams.numpy()
            out += [Prediction(float(scores[i]), cams[i]) for i in range(len(chunk))]
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
