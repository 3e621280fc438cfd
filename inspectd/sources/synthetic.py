"""`synthetic://?fps=10&width=320&height=240&defect_rate=0.3&seed=0&repeat=0&dwell=1`: a camera with no hardware.

Frames come from `inspectd.synth.render` (grey surfaces with labelled defects, replicated to RGB),
released at `fps` on the monotonic clock. Frame k (counted from 0 since the source was built) is a
pure function of (seed, k), so a test knows exactly what the camera showed: `sample(k)` renders it
again, and `last_sample` / `last_mask` hold the frame just returned. `repeat=N` cycles through the
first N frames (repeat=1: the same frame forever, its defects always at `sample(0).mask`); 0 means
every frame is new. `dwell=D` keeps each part under the camera for D frames (frames k and k+1 show
the same part unless k+1 is a multiple of D): a defect then stays in view for D frames, as on a
slow line, which makes defect episodes.
"""

from __future__ import annotations

__all__ = ["SyntheticSource"]

import time
from typing import TypedDict

import numpy as np

from inspectd.config import CameraConfig
from inspectd.imageio import to_rgb
from inspectd.sources.base import SKIPPED, Pacer, Skipped, SourceError, query_params
from inspectd.synth import Sample, render


class _Params(TypedDict):
    """The URL's parameters; each default's type is its conversion."""

    fps: float
    width: int
    height: int
    defect_rate: float
    seed: int
    repeat: int
    dwell: int


_DEFAULTS: _Params = {"fps": 10.0, "width": 320, "height": 240, "defect_rate": 0.3, "seed": 0, "repeat": 0, "dwell": 1}


class SyntheticSource:
    """Renders synthetic defect frames at a steady rate.

    >>> src = SyntheticSource(cfg)          # cfg.url = "synthetic://?fps=5&seed=1&defect_rate=1&repeat=1"
    >>> src.open(); img = src.read(1.0)
    >>> src.last_mask                        # 255 where the frame just read has a defect
    """

    def __init__(self, cfg: CameraConfig):
        p = query_params(cfg.url or "", _DEFAULTS)
        if not 16 <= p["width"] <= 8192 or not 16 <= p["height"] <= 8192:
            raise SourceError(f"synthetic: width and height must be 16..8192 (got {p['width']}x{p['height']})")
        if not 0.0 <= p["defect_rate"] <= 1.0 or p["repeat"] < 0 or p["dwell"] < 1:
            raise SourceError("synthetic: defect_rate must be within 0..1, repeat >= 0 and dwell >= 1")
        self.width, self.height, self.seed = p["width"], p["height"], p["seed"]
        self.defect_rate, self.repeat, self.dwell = p["defect_rate"], p["repeat"], p["dwell"]
        self._pacer = Pacer(p["fps"])
        self._index = 0
        self._cache: dict[int, Sample] = {}
        self.last_sample: Sample | None = None

    @property
    def last_mask(self) -> np.ndarray | None:
        """(H, W) uint8 mask of the frame last returned by `read` (255 = defect pixel)."""
        return None if self.last_sample is None else self.last_sample.mask

    def sample(self, index: int) -> Sample:
        """Frame `index` (from 0), rendered deterministically from (seed, index // dwell)."""
        part = index // self.dwell
        k = part % self.repeat if self.repeat else part
        if k in self._cache:
            return self._cache[k]
        rng = np.random.default_rng([self.seed, k])
        out = render(rng, self.width, self.height, defect=bool(rng.random() < self.defect_rate))
        if self.repeat or self.dwell > 1:  # a bounded set of frames, or the same part again: render each once
            if not self.repeat:
                self._cache.clear()  # only the part in view
            self._cache[k] = out
        return out

    @property
    def period_s(self) -> float:
        return self._pacer.period

    def open(self) -> None:
        self._pacer.reset()

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        if not self._pacer.wait(timeout_s):
            return None
        self._index += 1
        if time.monotonic() < skip_before:  # frame index-1 passed unseen: not rendered (a pure function of it)
            return SKIPPED
        self.last_sample = self.sample(self._index - 1)
        return to_rgb(self.last_sample.image)

    def close(self) -> None:
        pass
