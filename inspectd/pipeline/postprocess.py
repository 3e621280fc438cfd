"""Probability map -> mask and regions, encoded for the wire; the overlay of infer and watch. numpy + OpenCV
only (daemon path)."""

from __future__ import annotations

__all__ = [
    "Region",
    "MaskRule",
    "MASK_RULES",
    "InspectOptions",
    "Located",
    "probability",
    "upsample",
    "find_regions",
    "label_regions",
    "locate",
    "to_mask_u8",
    "overlay",
    "inspect",
]

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from inspectd.drawing import SIGMOID_JET, draw, map_index
from inspectd.frames import Inspection, published_probability
from inspectd.imageio import encode_jpeg, encode_png
from inspectd.model.masks import MASK_RULES, MaskRule, logit_to_probability
from inspectd.pipeline.episodes import EpisodeRules


@dataclass(frozen=True)
class Region:
    bbox: tuple[int, int, int, int]  # x, y, w, h in the map's pixels
    area_px: int
    peak: float
    mean: float

    def as_dict(self) -> dict:
        """As published (results.jsonl): peak and mean to PROBABILITY_DECIMALS."""
        return asdict(self) | {
            "bbox": list(self.bbox),
            "peak": published_probability(self.peak),
            "mean": published_probability(self.mean),
        }


def probability(cam_logits: np.ndarray) -> np.ndarray:
    """sigmoid(cam_logits): the calibrated per-location defect probability."""
    return (1.0 / (1.0 + np.exp(-np.clip(cam_logits, -60, 60)))).astype(np.float32)


def upsample(prob: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a CAM-resolution map to (width, height) (used on logits, before the sigmoid)."""
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)


def find_regions(prob: np.ndarray, threshold: float, min_area_px: int = 1, above: np.ndarray | None = None) -> list[Region]:
    """Connected components (8-connected) of prob >= threshold (or of the mask `above`), largest first."""
    return label_regions(prob, threshold, min_area_px, above)[0]


def label_regions(
    prob: np.ndarray, threshold: float, min_area_px: int = 1, above: np.ndarray | None = None
) -> tuple[list[Region], np.ndarray]:
    """`find_regions`, plus the uint8 0/255 mask of exactly the regions kept (smaller ones removed)."""
    binary = (prob >= threshold if above is None else above).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions, kept = [], np.zeros(n, bool)
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area_px:
            continue
        kept[i] = True
        values = prob[labels == i]
        regions.append(Region((x, y, w, h), area, float(values.max()), float(values.mean())))
    return sorted(regions, key=lambda r: -r.area_px), np.where(kept[labels], 255, 0).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class Located:
    """One image's map at image size, its mask threshold, and (judged defective) its regions."""

    prob: np.ndarray  # sigmoid of the upsampled logits
    mask_threshold: float  # this image's probability threshold under the rule
    logits: np.ndarray  # the upsampled logits prob was made from
    mask_logit: float  # the rule's logit threshold (the cut; inf: a flat map, no mask)
    regions: tuple = ()  # tuple[Region, ...], largest first; empty when judged ok
    kept: np.ndarray | None = None  # uint8 0/255: exactly the regions (None when judged ok)


def locate(cam_logits: np.ndarray, width: int, height: int, rule: MaskRule, is_defect: bool, min_region_px: int = 1) -> Located:
    """The daemon's and `infer`'s one path from a CAM to regions at image size.

    The logits are upsampled, then turned into probabilities: a bilinear map of logits thresholded
    at one logit is exactly the probability map thresholded at its sigmoid. The mask is taken on the
    logits: float32 probabilities saturate to 1.0 above a logit of ~17."""
    logits = upsample(np.asarray(cam_logits, np.float32), width, height)
    prob = probability(logits)
    t = rule.logit_threshold(cam_logits)  # once: a quantile rule sorts the map
    mask_threshold = logit_to_probability(t)
    if not is_defect:
        return Located(prob, mask_threshold, logits, t)
    regions, kept = label_regions(prob, mask_threshold, min_region_px, logits >= t)
    return Located(prob, mask_threshold, logits, t, tuple(regions), kept)


def to_mask_u8(prob: np.ndarray) -> np.ndarray:
    """Probability 0..1 -> uint8 0..255 (the wire format's and infer's mask encoding)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def overlay(
    image_rgb: np.ndarray,
    logits: np.ndarray,
    score: float,
    threshold: float,
    mask_logit: float,
    mask: np.ndarray | None = None,
    regions: tuple = (),
    mode: str = "relative",
) -> np.ndarray:
    """RGB image + the map (`logits` at image size, drawn as `mode`: relative to the frame's mask threshold
    `mask_logit`, or the probability; inspectd.drawing.MAP_MODES), the mask's contours, the regions' boxes, a colour
    legend, score and verdict (`inspectd.drawing.draw`, as the live view draws). The relative map agrees with
    `mask` (the published regions) where it is given (`map_index`)."""
    boxes = [tuple(r.bbox if hasattr(r, "bbox") else r["bbox"]) for r in regions]
    heat = map_index(logits, mode, mask_logit, score >= threshold, mask)
    picture = draw(
        cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
        heat,
        SIGMOID_JET,
        mask=mask,
        boxes=boxes,
        verdict=(score, threshold),
        legend=mode,
    )
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class InspectOptions:
    """How an inference result becomes an Inspection (from [model] and [postprocess])."""

    threshold: float
    mask_rule: MaskRule = MaskRule()
    mask_resolution: str = "frame"  # frame | cam
    min_region_px: int = 1
    attach_frame: bool = False
    jpeg_quality: int = 85
    results: bool = False  # publish result.<camera> for every frame (masks of good frames are encoded too)
    archive_frame: str = ""  # [archive] on: the frame kept with every defect, "jpeg" or "png"; "" = archive off
    archive_ok_every: int = 0  # [archive] ok_every: also keep the ok frames whose frame_seq is a multiple of it
    episode_rules: EpisodeRules | None = None  # [episodes] (None: the defaults for `threshold`)
    episode_mode: str = "frames"  # frames | episode

    @property
    def episodes(self) -> EpisodeRules:
        return self.episode_rules or EpisodeRules(exit_threshold=0.8 * self.threshold)

    def archives(self, frame, is_defect: bool) -> bool:
        """Whether this frame goes to the archive: every defect, and one ok frame in `archive_ok_every`."""
        if not self.archive_frame:
            return False
        return is_defect or (self.archive_ok_every > 0 and frame.seq % self.archive_ok_every == 0)


def inspect(frame, score: float, cam_logits: np.ndarray, opts: InspectOptions):
    """Probability map -> regions (frame pixels), mask PNG, optional JPEG: one frame's Inspection.

    Only what leaves the daemon is computed: a frame judged ok, without `results`, gets its threshold
    from the CAM and no map at frame size, no regions and no PNG (most frames on a line are ok)."""

    is_defect = bool(score >= opts.threshold)
    jpeg, kept, encoding = _frame_outputs(frame, is_defect, opts)
    if not (is_defect or opts.results):
        size = (frame.width, frame.height) if opts.mask_resolution == "frame" else cam_logits.shape[::-1]
        return Inspection(
            frame=frame,
            score=float(score),
            threshold=opts.threshold,
            is_defect=False,
            regions=(),
            mask_png=b"",
            mask_size=size,
            frame_jpeg=jpeg,
            mask_threshold=logit_to_probability(opts.mask_rule.logit_threshold(cam_logits)),
            regions_png=b"",
            archive_frame=kept,
            archive_encoding=encoding,
        )
    found = locate(cam_logits, frame.width, frame.height, opts.mask_rule, is_defect, opts.min_region_px)
    # Exactly the published regions, losslessly: the 8-bit probability PNG cannot reproduce them where
    # the map saturates (a per-image threshold above 254.5/255) or where rounding crosses the threshold.
    regions_png = encode_png(found.kept) if found.kept is not None else b""
    mask = found.prob if opts.mask_resolution == "frame" else probability(cam_logits)
    return Inspection(
        frame=frame,
        score=float(score),
        threshold=opts.threshold,
        is_defect=is_defect,
        regions=found.regions,
        mask_png=encode_png(to_mask_u8(mask)),
        mask_size=(mask.shape[1], mask.shape[0]),
        frame_jpeg=jpeg,
        mask_threshold=found.mask_threshold,
        regions_png=regions_png,
        archive_frame=kept,
        archive_encoding=encoding,
    )


def _frame_outputs(frame, is_defect: bool, opts: InspectOptions) -> tuple[bytes, bytes, str]:
    """(the JPEG attached to the event, the frame kept by the archive, its encoding), each encoded only if wanted."""
    attach = opts.attach_frame and is_defect
    archive = opts.archives(frame, is_defect)
    if not (attach or archive):
        return b"", b"", ""
    bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)  # converted once for both encodings
    jpeg = encode_jpeg(bgr, opts.jpeg_quality, rgb=False) if attach or (archive and opts.archive_frame == "jpeg") else b""
    kept = b""  # the frame for the archive: the attached JPEG itself when the formats agree, else encoded once
    if archive:
        kept = jpeg if opts.archive_frame == "jpeg" else encode_png(bgr, rgb=False)
    return jpeg if attach else b"", kept, opts.archive_frame if archive else ""
