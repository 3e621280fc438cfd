"""How an inspection is drawn for a person, in one place: `infer` and `watch --save` overlays, the recent
defects' detail view, the live view's pictures and the recent-defect thumbnails all call `draw`.

    picture = draw(bgr, heat, mask=regions_mask, boxes=[(x, y, w, h)], verdict=(score, threshold))

The frame with the map blended in (jet), the mask's contours (white), the regions' boxes (yellow),
the verdict and score top left (red DEFECT, green ok), a colour bar bottom right. Works in OpenCV's
BGR order throughout; callers holding RGB convert once, before and after. About a dozen OpenCV
calls, each of which releases the GIL: the live view draws next to the inference thread
(docs/performance.md: a version in some forty numpy and OpenCV calls cost a saturated CPU 15 % of its
inspected frames with two viewers).
"""

from __future__ import annotations

__all__ = ["ALPHA", "draw"]

import functools
from collections.abc import Iterable

import cv2
import numpy as np

ALPHA = 0.35  # the map's weight in the blend
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _YELLOW = (255, 255, 255), (0, 255, 255)  # BGR
_RED, _GREEN = (64, 64, 255), (64, 255, 64)


def draw(
    picture: np.ndarray,
    heat: np.ndarray | None,
    colormap: int | np.ndarray = cv2.COLORMAP_JET,
    *,
    mask: np.ndarray | None = None,
    boxes: Iterable[tuple[int, int, int, int]] = (),
    verdict: tuple[float, float] | None = None,
    legend: bool = True,
) -> np.ndarray:
    """A new BGR picture: `picture` (HxWx3 BGR uint8) with `heat` (HxW uint8, 255 = probability 1, or
    None: no map) coloured by `colormap` (an OpenCV colormap, or a 256x1x3 lookup table) and blended in;
    the outer contours of `mask` (HxW, non-zero inside); `boxes` (x, y, width, height); `verdict`
    (score, threshold) as text; the colour bar when `legend`."""
    out = picture if heat is None else cv2.addWeighted(picture, 1.0 - ALPHA, cv2.applyColorMap(heat, colormap), ALPHA, 0.0)
    if out is picture:
        out = picture.copy()
    line = max(1, round(min(out.shape[:2]) / 200))
    if mask is not None and mask.any():
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _WHITE, line, cv2.LINE_AA)
    for x, y, w, h in boxes:
        cv2.rectangle(out, (int(x), int(y)), (int(x + max(1, w) - 1), int(y + max(1, h) - 1)), _YELLOW, line)
    bar = _legend(out.shape[1], out.shape[0]) if legend else None
    if bar is not None:
        (x0, y0), patch = bar
        region = out[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
        np.copyto(region, patch, where=patch.any(axis=2, keepdims=True))
    if verdict is not None:
        _verdict(out, *verdict)
    return out


@functools.lru_cache(maxsize=16)
def _legend(width: int, height: int) -> tuple[tuple[int, int], np.ndarray] | None:
    """The colour bar (probability 1 at the top, 0 at the bottom) with its labels, drawn once per picture size:
    ((x, y) of its corner, the BGR patch); None when the picture is too small for it."""
    bar_h, bar_w = max(16, height // 3), max(6, width // 50)
    pad = 26  # room for the labels, left of the bar
    if bar_h + 8 > height or bar_w + pad + 8 > width:
        return None
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)[:, None].repeat(bar_w, axis=1)
    out = np.zeros((bar_h + 8, bar_w + pad, 3), np.uint8)
    out[4 : 4 + bar_h, pad:] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    scale = max(0.3, min(0.5, height / 600))
    for text, y in (("p 1", 12), ("0", 4 + bar_h)):
        (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
        cv2.putText(out, text, (pad - tw - 3, y), _FONT, scale, _WHITE, 1, cv2.LINE_AA)
    return (width - bar_w - pad - 4, height - bar_h - 8), out


def _verdict(picture: np.ndarray, score: float, threshold: float) -> None:
    """'DEFECT score 0.973' (red) or 'ok score 0.041' (green) on black, top left, about a third of the width."""
    defect = score >= threshold
    text = f"{'DEFECT' if defect else 'ok'}  score {score:.3f}"
    scale, thick = _text_size(picture.shape[1])
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    cv2.rectangle(picture, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
    cv2.putText(picture, text, (4, th + 4), _FONT, scale, _RED if defect else _GREEN, thick, cv2.LINE_AA)


@functools.lru_cache(maxsize=16)
def _text_size(width: int) -> tuple[float, int]:
    """The verdict's font scale and thickness: about a third of the width, never wider than the picture."""
    (unit_w, _), _ = cv2.getTextSize("DEFECT  score 0.000", _FONT, 1.0, 2)
    scale = max(0.1, min(min(max(0.35 * width / unit_w, 0.4), 1.5), (width - 8) / unit_w))
    return scale, max(1, round(scale * 2))
