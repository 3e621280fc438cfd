"""What moves between the daemon's stages: frozen dataclasses, each carrying camera, sequence and time."""

from __future__ import annotations

__all__ = [
    "CameraState",
    "DropReason",
    "Frame",
    "Batch",
    "Inspection",
    "PartTag",
    "Verdict",
    "PartResult",
    "lost_frame",
    "PROBABILITY_DECIMALS",
    "published_probability",
]


import enum
from dataclasses import dataclass

import numpy as np

# Probabilities are published (events, results.jsonl) to 6 decimals: finer than any threshold a person sets or
# the 8-bit mask shows (1/255), and never 0.9999999999988829 for a threshold the mask rule put at logit 27.
PROBABILITY_DECIMALS = 6


def published_probability(value: float) -> float:
    """A probability (score, threshold, mask threshold, a region's peak or mean) as it is published."""
    return round(float(value), PROBABILITY_DECIMALS)


class CameraState(str, enum.Enum):
    """A camera's connection state. Allowed transitions:

    STARTING -> UP | DOWN;  UP -> DOWN (error, end of stream, stall);  DOWN -> UP (reconnected);
    any -> STOPPED (shutdown). Every transition is counted, exported as `inspectd_camera_up`, and
    published on `status.<camera>`.
    """

    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    STOPPED = "stopped"


class DropReason(str, enum.Enum):
    """Why a captured frame was not inferred: the `reason` label of `inspectd_frames_dropped_total`.

    For every camera, captured = inferred + dropped (all reasons) + in flight: no frame leaves the
    pipeline uncounted (docs/daemon.md, "Frame accounting").
    """

    STALE = "stale"  # replaced by a newer frame of the same camera before the batcher took it
    FPS_LIMIT = "fps_limit"  # over the camera's fps_limit
    DECODE = "decode"  # the frame arrived but could not be decoded
    ROI = "roi"  # the camera's roi lies outside the frame
    ERROR = "error"  # an unexpected failure: its batch's model call, or its crop/resize on the capture thread
    SHUTDOWN = "shutdown"  # still waiting when its camera was stopped (shutdown, reload)
    QUEUE_FULL = "queue_full"  # part mode: the camera's part queue was full when the part arrived
    DEADLINE = "deadline"  # part mode: its deadline passed while it waited for the model
    INCOMPLETE = "incomplete"  # a GenICam image arrived incomplete (lost packets), or with no free buffer
    CAMERA = "camera"  # the camera never sent the image of a trigger (triggered GenICam cameras)


@dataclass(frozen=True)
class PartTag:
    """What makes a frame a part (a camera in part mode, docs/parts.md): its id and its deadline."""

    part_id: str
    deadline_mono: float  # monotonic time by which its verdict must be out: captured + deadline_ms
    trigger_at: float | None = None  # wall clock of the trigger that asked for it (None: no trigger)


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured image. `image` is HxWx3 RGB uint8 (after the camera's ROI crop)."""

    camera: str
    seq: int  # per-camera capture counter, from 1
    captured_at: float  # wall clock, time.time()
    captured_mono: float  # time.monotonic(), for latency measurements
    image: np.ndarray
    part: PartTag | None = None  # set on cameras in part mode: every such frame gets exactly one verdict

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def lost_frame(camera: str, seq: int, part: PartTag, captured_at: float, captured_mono: float) -> Frame:
    """A part whose image never became a frame (undecodable, roi outside it): a Frame with a 0x0 image."""
    return Frame(camera, seq, captured_at, captured_mono, np.zeros((0, 0, 3), np.uint8), part)


@dataclass(frozen=True, eq=False)
class Batch:
    """Frames inferred together (one per camera per round: several only from a part queue), in round-robin order."""

    frames: tuple[Frame, ...]


@dataclass(frozen=True, eq=False)
class Inspection:
    """The model's verdict on one frame, post-processed and ready to publish."""

    frame: Frame
    score: float
    threshold: float
    is_defect: bool
    regions: tuple = ()  # tuple[postprocess.Region, ...] in frame pixels
    mask_png: bytes = b""  # probability 0-255, at `mask_size`
    mask_size: tuple[int, int] = (0, 0)  # (width, height)
    frame_jpeg: bytes = b""
    mask_threshold: float = 0.5  # this frame's probability threshold for the mask (the model's mask rule)
    regions_png: bytes = b""  # defects: 255 on exactly the published regions, 0 elsewhere, at frame size
    archive_frame: bytes = b""  # the frame for the archive (every defect, sampled ok frames), when it is on
    archive_encoding: str = ""  # "jpeg" or "png" (the archive's frame_format)
    episode: int | None = None  # the camera's defect episode this frame belongs to (set in frame order)


class Verdict(str, enum.Enum):
    """A part's one verdict (part mode): the model's, or NOT_INSPECTED when it could not have one in time."""

    DEFECT = "defect"
    OK = "ok"
    NOT_INSPECTED = "not_inspected"


@dataclass(frozen=True, eq=False)
class PartResult:
    """One part's verdict, as published on `part.<camera>` and written to the part log.

    `action` is what the line does with the part: `reject` for a defect, `accept` for an ok part, and the
    camera's `not_inspected` setting (fail-safe `reject` by default) for a part without a verdict in time.
    """

    camera: str
    part_id: str
    frame_seq: int
    verdict: Verdict
    action: str  # "accept" | "reject"
    reason: str  # why not_inspected ("" otherwise)
    captured_at: float  # wall clock
    decided_at: float  # wall clock
    latency_s: float  # capture to verdict, on the monotonic clock
    trigger_at: float | None = None
    score: float | None = None  # None: the model never ran on it
    threshold: float | None = None
