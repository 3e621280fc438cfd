"""Learning-rate schedule of the reference: linear warm-up from 0, hold at the peak, cosine decay to 0."""

from __future__ import annotations

__all__ = ["WarmupHoldCosine"]

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="inspectd")
class WarmupHoldCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): 0 -> peak over `warmup` of the steps, `peak` for `hold` of them, then cosine to 0.

    >>> sched = WarmupHoldCosine(1e-3, total_steps=1000)   # 15 % warm-up, 10 % hold
    """

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.15, hold: float = 0.10):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup = float(warmup)
        self.hold = float(hold)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm_steps = max(1.0, self.warmup * self.total_steps)
        hold_end = warm_steps + self.hold * self.total_steps
        decay_steps = max(1.0, self.total_steps - hold_end)
        progress = ops.clip((step - hold_end) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        rising = self.peak * step / warm_steps
        return ops.where(step < warm_steps, rising, ops.where(step < hold_end, self.peak, cosine))

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup, "hold": self.hold}
