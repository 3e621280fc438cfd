"""Mask supervision: a pixel loss on cam_logits beside the image-level loss (mixed supervision).

    loss = image_loss(score, label) + weight * pixel_loss(cam_logits, mask)

The deployable contract does not change: the same head, one pass, `score` = sigmoid(pool(cam_logits)).
Only the training model gains a second output, the map, and the pixel loss sees it where a target
exists: defect images with a mask in DATASET/masks/, and ok images, whose maps are all background
(free labels; `ok_negatives`). A defect image without a mask weighs 0 there, as in Božič, Tabernik
and Skočaj's mixed supervision (2021), where the image-level loss alone teaches those.

`resolution` is where the loss looks: the map is upsampled bilinearly (as the daemon upsamples it
before cutting regions) to the input size divided by `resolution`, and the mask is area-averaged to
the same grid, so a cell's target is the defect's share of it. At the map's own stride (16) a thin
crack is a few per cent of a cell; at 4 the loss sees its outline.

`balanced` averages the loss over defect pixels and over background pixels separately and adds the
two, so a defect covering 0.5 % of a tile is not outvoted 200:1; otherwise every supervised pixel
weighs the same. Written by hand because no Keras loss takes a per-image mask weight and a resize.
"""

from __future__ import annotations

__all__ = ["PixelLoss"]

from dataclasses import dataclass


@dataclass(frozen=True)
class PixelLoss:
    weight: float = 1.0  # of the pixel loss against the image-level one
    resolution: int = 4  # the loss's grid: input size / resolution
    balanced: bool = True  # defect and background pixels weigh half each
    ok_negatives: bool = True  # ok images' maps are all-background targets

    def __str__(self) -> str:
        parts = [f"weight {self.weight:g}", f"at 1/{self.resolution} of the input", "balanced" if self.balanced else "plain"]
        return ", ".join(parts) + (", ok images as background" if self.ok_negatives else "")

    def loss(self, input_size: tuple[int, int]):
        """The Keras loss for the map output: y_true [B, H, W, 2] (defect share, weight), y_pred cam logits
        [B, h, w, 1] -> one value per image."""
        import tensorflow as tf

        width, height = input_size
        grid = (max(1, height // self.resolution), max(1, width // self.resolution))
        balanced = self.balanced

        def pixel_loss(y_true, y_pred):
            logits = tf.image.resize(tf.cast(y_pred, tf.float32), grid, method="bilinear")
            targets = tf.image.resize(tf.cast(y_true, tf.float32), grid, method="area")
            target, weight = targets[..., :1], targets[..., 1:]
            bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
            if not balanced:
                return tf.reduce_mean(weight * bce, axis=[1, 2, 3])
            pos, neg = weight * target, weight * (1.0 - target)
            sums = [tf.reduce_sum(w, axis=[1, 2, 3]) for w in (pos, neg)]
            terms = [tf.reduce_sum(w * bce, axis=[1, 2, 3]) for w in (pos, neg)]
            return sum(tf.math.divide_no_nan(t, s) for t, s in zip(terms, sums))

        return pixel_loss
