"""How an inspection is drawn for a person, in one place: `infer` and `watch --save` overlays, the recent
defects' detail view, the live view's pictures and the recent-defect thumbnails all call `draw`.

    heat = map_index(logits, "relative", mask_logit, is_defect)   # None: nothing to blend
    picture = draw(bgr, heat, SIGMOID_JET, mask=regions_mask, boxes=[(x, y, w, h)], verdict=(score, threshold),
                   legend="relative")

The frame with the map blended in (jet), the mask's contours (white), the regions' boxes (yellow),
the verdict and score top left (red DEFECT, green ok), a colour bar bottom right.

Two maps (MAP_MODES). `relative`, the default everywhere: the logits less the frame's own mask
threshold (the logit its regions are cut at), so green is the cut, yellow to red is inside the
mask, blue outside; drawn on frames judged defective only (an ok frame publishes no mask, and a map
stretched to its own threshold would paint red on a good part). `probability`: sigmoid(cam_logits),
the calibrated per-location probability, on every frame; a confident frame is red over much of its
area while its published region is tight, which is why it is not the default. Works in OpenCV's
BGR order throughout; callers holding RGB convert once, before and after. About a dozen OpenCV
calls, each of which releases the GIL: the live view draws next to the inference thread
(docs/performance.md: a version in some forty numpy and OpenCV calls cost a saturated CPU 15 % of its
inspected frames with two viewers).
"""

from __future__ import annotations

__all__ = ["ALPHA", "LOGIT_SPAN", "MAP_MODES", "SIGMOID_JET", "draw", "logit_of", "logits_of", "logits_of_u8", "map_index"]

import functools
from collections.abc import Iterable

import cv2
import numpy as np

ALPHA = 0.35  # the map's weight in the blend
MAP_MODES = ("relative", "probability")
# A logit quantized to 0..255 over [-LOGIT_SPAN, +LOGIT_SPAN] indexes the jet colour of its sigmoid (SIGMOID_JET), so
# one cv2.applyColorMap draws sigmoid + colour map in a single C call.
LOGIT_SPAN = 8.0


def _sigmoid_jet() -> np.ndarray:
    logits = np.linspace(-LOGIT_SPAN, LOGIT_SPAN, 256)
    prob = np.rint(255.0 / (1.0 + np.exp(-logits))).astype(np.uint8)
    return cv2.applyColorMap(prob.reshape(256, 1), cv2.COLORMAP_JET).reshape(256, 1, 3)  # BGR


SIGMOID_JET = _sigmoid_jet()


def map_index(
    logits: np.ndarray, mode: str, mask_logit: float, is_defect: bool, mask: np.ndarray | None = None
) -> np.ndarray | None:
    """The map to blend as SIGMOID_JET indexes (HxW uint8) from logits at picture size: `relative` shifts them by the
    frame's mask threshold `mask_logit` (the cut lands on index 128, green) and is None on a frame judged ok or with
    no threshold (a flat map's); `probability` takes them as they are.

    With `mask` (the published regions, exact) the relative map agrees with it: logits read back from an 8-bit
    probability PNG cannot tell values above ~6 apart, so inside the mask is drawn at least just above the cut and
    outside just below it at most (a part of the map above the cut but smaller than min_region_px is outside too)."""
    if mode == "relative":
        if not is_defect or not np.isfinite(mask_logit):
            return None
        logits = cv2.subtract(np.asarray(logits, np.float32), float(mask_logit))  # type: ignore[call-overload]
    # convertScaleAbs takes |x|: clip first, so that a very negative logit is blue, not red.
    index = cv2.convertScaleAbs(np.clip(logits, -LOGIT_SPAN, LOGIT_SPAN), alpha=127.5 / LOGIT_SPAN, beta=127.5)
    if mode == "relative" and mask is not None:
        index = np.where(np.asarray(mask) > 0, np.maximum(index, 136), np.minimum(index, 120)).astype(np.uint8)
    return index


def _u8_logits() -> np.ndarray:
    levels = np.arange(256, dtype=np.float64)
    # 255 stands for every probability from 254.5/255 up: its lower bound, so a saturated pixel of the PNG is not drawn
    # nearer a high cut than it is known to be (0 likewise: the top of its bin).
    p = np.clip(levels, 0.5, 254.5) / 255.0
    return np.log(p / (1 - p)).astype(np.float32)


_U8_LOGITS = _u8_logits()


def logits_of_u8(mask: np.ndarray) -> np.ndarray:
    """Logits from an 8-bit probability map (the mask attachment, 0-255): a 256-entry lookup."""
    return _U8_LOGITS[np.asarray(mask, np.uint8)]


def logit_of(prob: float) -> float:
    """One probability (an event's mask_threshold) as a logit, clipped as `logits_of` clips."""
    return float(logits_of(np.array([prob], np.float32))[0])


def logits_of(prob: np.ndarray) -> np.ndarray:
    """Logits back from a probability map (a mask PNG / 255, or sigmoid output), clipped to +-LOGIT_SPAN."""
    p = np.clip(np.asarray(prob, np.float32), 1 / (1 + np.exp(LOGIT_SPAN)), 1 / (1 + np.exp(-LOGIT_SPAN)))
    return np.log(p / (1 - p))


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
    legend: str | None = "probability",
) -> np.ndarray:
    """A new BGR picture: `picture` (HxWx3 BGR uint8) with `heat` (HxW uint8 indexes into `colormap`, an OpenCV
    colormap or a 256x1x3 lookup table; None: no map) blended in; the outer contours of `mask` (HxW, non-zero
    inside); `boxes` (x, y, width, height); `verdict` (score, threshold) as text; the colour bar labelled for
    `legend` (a MAP_MODES entry; None: no bar)."""
    out = picture if heat is None else cv2.addWeighted(picture, 1.0 - ALPHA, cv2.applyColorMap(heat, colormap), ALPHA, 0.0)
    if out is picture:
        out = picture.copy()
    line = max(1, round(min(out.shape[:2]) / 200))
    if mask is not None and mask.any():
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _WHITE, line, cv2.LINE_AA)
    for x, y, w, h in boxes:
        cv2.rectangle(out, (int(x), int(y)), (int(x + max(1, w) - 1), int(y + max(1, h) - 1)), _YELLOW, line)
    bar = _legend(out.shape[1], out.shape[0], legend) if legend else None
    if bar is not None:
        (x0, y0), patch = bar
        region = out[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
        np.copyto(region, patch, where=patch.any(axis=2, keepdims=True))
    if verdict is not None:
        _verdict(out, *verdict)
    return out


# The colour bar's labels (text, height from 0 at the bottom to 1 at the top) for each map.
_LABELS = {
    "probability": (("p 1", 1.0), ("0", 0.0)),
    "relative": (("in", 1.0), ("cut", 0.5), ("out", 0.0)),  # above / at / below the frame's mask threshold
}


@functools.lru_cache(maxsize=16)
def _legend(width: int, height: int, mode: str = "probability") -> tuple[tuple[int, int], np.ndarray] | None:
    """The colour bar (the top of the map's scale at the top) with its labels for `mode`, drawn once per picture size:
    ((x, y) of its corner, the BGR patch); None when the picture is too small for it."""
    bar_h, bar_w = max(16, height // 3), max(6, width // 50)
    scale = max(0.3, min(0.5, height / 600))
    labels = _LABELS[mode]
    pad = 6 + max(cv2.getTextSize(text, _FONT, scale, 1)[0][0] for text, _ in labels)  # room for the labels, left of the bar
    if bar_h + 8 > height or bar_w + pad + 8 > width:
        return None
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)[:, None].repeat(bar_w, axis=1)
    out = np.zeros((bar_h + 8, bar_w + pad, 3), np.uint8)
    out[4 : 4 + bar_h, pad:] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    for text, level in labels:
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
        y = round(4 + (1.0 - level) * bar_h + th * level)  # the top label below the bar's top, the bottom one on it
        cv2.putText(out, text, (pad - tw - 3, min(max(y, th + 1), bar_h + 6)), _FONT, scale, _WHITE, 1, cv2.LINE_AA)
    if mode == "relative":
        cv2.line(out, (pad - 2, 4 + bar_h // 2), (pad + bar_w - 1, 4 + bar_h // 2), _WHITE, 1)  # the cut
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
