"""Mask rules: how a CAM becomes a mask, as one logit threshold per image (numpy only).

Imported by the config (validation), the model file (its own rule) and post-processing; it needs
no OpenCV, so checking a config or reading a model's metadata stays light.
"""

from __future__ import annotations

__all__ = ["MASK_RULES", "MaskRule"]

import math
from dataclasses import dataclass

import numpy as np

# rule -> (meaning of its parameter, allowed range, default)
MASK_RULES = {
    "probability": ("a fixed probability threshold on sigmoid(cam_logits)", (0.0, 1.0), 0.5),
    "relative": ("logits at least PARAM above the image's own mean logit", (-50.0, 50.0), 2.0),
    "quantile": ("the top (1 - PARAM) share of the image's map (PARAM = 0.99: the top 1 %)", (0.0, 1.0), 0.99),
    "minmax": ("the reference's per-image min-max scaled map >= PARAM", (0.0, 1.0), 0.5),
}


@dataclass(frozen=True)
class MaskRule:
    """How a CAM becomes a mask: every rule gives one logit threshold per image (`logit_threshold`).

    The published mask is always the probability map; `sigmoid(logit_threshold)` is the per-image
    probability threshold a consumer binarizes it with (the `mask_threshold` of an event).
    """

    kind: str = "probability"
    param: float = 0.5

    def __post_init__(self):
        if self.kind not in MASK_RULES:
            raise ValueError(f"mask rule {self.kind!r}: choose one of {', '.join(MASK_RULES)}")
        lo, hi = MASK_RULES[self.kind][1]
        if not (lo <= self.param <= hi) or math.isnan(self.param):
            raise ValueError(f"mask rule {self.kind}: parameter {self.param} outside [{lo:g}, {hi:g}]")

    def __str__(self) -> str:
        return f"{self.kind}:{self.param:g}"

    def as_meta(self) -> dict:
        return {"kind": self.kind, "param": self.param}

    @classmethod
    def parse(cls, text: str) -> MaskRule:
        """'probability:0.5' | 'relative:2' | 'quantile:0.99' | 'minmax:0.5' (no parameter: the rule's default)."""
        kind, _, value = text.strip().lower().partition(":")
        if kind not in MASK_RULES:
            raise ValueError(f"mask rule {text!r}: choose one of {', '.join(MASK_RULES)}")
        try:
            return cls(kind, float(value) if value else MASK_RULES[kind][2])
        except ValueError as exc:
            raise ValueError(f"mask rule {text!r}: {exc}") from None

    def logit_threshold(self, cam_logits: np.ndarray) -> float:
        """The logit a location must reach to be in this image's mask."""
        if self.kind == "probability":
            p = min(max(self.param, 1e-7), 1 - 1e-7)
            return math.log(p / (1 - p))
        x = np.asarray(cam_logits, np.float64)
        if self.kind == "relative":
            return float(x.mean() + self.param)
        if self.kind == "quantile":
            return float(np.quantile(x, self.param))
        lo, hi = float(x.min()), float(x.max())
        return lo + self.param * (hi - lo) if hi > lo else math.inf

    def probability_threshold(self, cam_logits: np.ndarray) -> float:
        """sigmoid(logit_threshold): the per-image threshold on the probability map."""
        return logit_to_probability(self.logit_threshold(cam_logits))


def logit_to_probability(t: float) -> float:
    """sigmoid of a logit threshold (inf, a flat map's minmax threshold: 1.0, nothing is above it)."""
    return 1.0 if t == math.inf else float(1.0 / (1.0 + math.exp(-min(max(t, -60.0), 60.0))))
