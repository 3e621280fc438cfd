"""Probability map -> mask and regions; overlay rendering. numpy + OpenCV only (daemon path)."""

from __future__ import annotations

__all__ = [
    "Region", "InspectOptions", "probability", "upsample", "find_regions", "to_mask_u8", "encode_png", "overlay", "inspect",
]

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Region:
    bbox: tuple[int, int, int, int]  # x, y, w, h in the map's pixels
    area_px: int
    peak: float
    mean: float

    def as_dict(self) -> dict:
        return asdict(self) | {"bbox": list(self.bbox)}


def probability(cam_logits: np.ndarray) -> np.ndarray:
    """sigmoid(cam_logits): the calibrated per-location defect probability."""
    return (1.0 / (1.0 + np.exp(-np.clip(cam_logits, -60, 60)))).astype(np.float32)


def upsample(prob: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a CAM-resolution map to (width, height)."""
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)


def find_regions(prob: np.ndarray, threshold: float, min_area_px: int = 1) -> list[Region]:
    """Connected components (8-connected) of prob >= threshold, largest first."""
    binary = (prob >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area_px:
            continue
        values = prob[labels == i]
        regions.append(Region((x, y, w, h), area, float(values.max()), float(values.mean())))
    return sorted(regions, key=lambda r: -r.area_px)


def to_mask_u8(prob: np.ndarray) -> np.ndarray:
    """Probability 0..1 -> uint8 0..255 (the wire format's and infer's mask encoding)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def overlay(image_rgb: np.ndarray, prob: np.ndarray, score: float, threshold: float, alpha: float = 0.35) -> np.ndarray:
    """Image + jet heatmap of the probability map (at image size), score and verdict printed."""
    heat = cv2.applyColorMap(to_mask_u8(prob), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(image_rgb, 1.0 - alpha, heat, alpha, 0.0)
    defect = score >= threshold
    text = f"{'DEFECT' if defect else 'ok'}  score {score:.3f}"
    (unit_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 2)
    scale = min(max(0.35 * out.shape[1] / unit_w, 0.4), 1.5)  # about a third of the width...
    scale = max(0.1, min(scale, (out.shape[1] - 8) / unit_w))  # ...and never wider than the image
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
    color = (255, 64, 64) if defect else (64, 255, 64)
    cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    return out


@dataclass(frozen=True)
class InspectOptions:
    """How an inference result becomes an Inspection (from [model] and [postprocess])."""

    threshold: float
    mask_threshold: float
    mask_resolution: str = "frame"  # frame | cam
    min_region_px: int = 1
    attach_frame: bool = False
    jpeg_quality: int = 85
    results: bool = False  # publish result.<camera> for every frame (masks of good frames are encoded too)


def inspect(frame, score: float, cam_logits: np.ndarray, opts: InspectOptions):
    """Probability map -> regions (frame pixels), mask PNG, optional JPEG: one frame's Inspection."""
    from inspectd.frames import Inspection

    cam_prob = probability(cam_logits)
    prob = upsample(cam_prob, frame.width, frame.height)
    is_defect = bool(score >= opts.threshold)
    regions = tuple(find_regions(prob, opts.mask_threshold, opts.min_region_px)) if is_defect else ()
    mask = prob if opts.mask_resolution == "frame" else cam_prob
    png = encode_png(to_mask_u8(mask)) if is_defect or opts.results else b""
    jpeg = b""
    if opts.attach_frame and is_defect:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, opts.jpeg_quality])
        jpeg = buf.tobytes() if ok else b""
    return Inspection(frame=frame, score=float(score), threshold=opts.threshold, is_defect=is_defect, regions=regions,
                      mask_png=png, mask_size=(mask.shape[1], mask.shape[0]), frame_jpeg=jpeg)
