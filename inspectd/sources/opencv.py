"""OpenCV sources: RTSP and video files through FFmpeg, V4L2 devices through OpenCV's V4L2 backend.

FFmpeg gets the camera's `open_timeout_s` as both its open and its read timeout, always: without
them a frozen RTSP camera keeps `read()` blocked or returning late frames for minutes. Even with
them a read cannot be interrupted from another thread, and one on a frozen stream returns only
after about 3x the read timeout (measured), so stop() and the heartbeat can lag by that much.

A camera sending several H.264 slices per frame comes out of OpenCV 5.0's FFmpeg path torn: every
slice of a keyframe is returned as a frame of its own with the rest made up, and the frame after
inherits the damage (measured, benchmarks/rtsp_backends.py). Such frames share a timestamp, so the
first repeat is logged as a WARNING that names the fix (the GStreamer backend, or one slice per frame).

Video files are paced at the file's own frame rate (a file behaves like a camera, it is not decoded
as fast as possible) and start again at the end when the camera has `loop = true`.
"""

from __future__ import annotations

__all__ = ["OpenCVSource", "DEFAULT_FILE_FPS"]

import logging
import os
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from inspectd.config import CameraConfig
from inspectd.imageio import to_rgb
from inspectd.sources.base import SKIPPED, DecodeError, EndOfStream, Pacer, Skipped, SourceError, redact

log = logging.getLogger("inspectd.sources")
DEFAULT_FILE_FPS = 25.0  # when a file does not say (or says something absurd)
_STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})


def _target(url: str) -> tuple[str, str]:
    """(kind, what to hand to cv2.VideoCapture): kind is 'stream', 'device' or 'file'."""
    parts = urlsplit(url)
    if parts.scheme in _STREAM_SCHEMES:
        return "stream", url
    if parts.scheme == "v4l2":
        return "device", unquote(parts.netloc + parts.path)
    if parts.scheme == "file":
        return "file", unquote(parts.netloc + parts.path)
    return "file", url


class OpenCVSource:
    """`cv2.VideoCapture` behind the Source protocol (FFmpeg for streams and files, V4L2 for devices)."""

    def __init__(self, cfg: CameraConfig):
        self.url = cfg.url or ""
        self.camera = cfg.id
        self.kind, self._target = _target(self.url)
        self._last_pts: float | None = None  # streams: to notice frames that share a timestamp
        self._warned_slices = False
        self.loop = cfg.loop
        self.timeout_ms = max(1, round(cfg.open_timeout_s * 1000))
        self._cap: cv2.VideoCapture | None = None
        self._pacer: Pacer | None = None  # files only

    @property
    def period_s(self) -> float:
        """The file's frame period once open (0 for live streams and devices)."""
        return self._pacer.period if self._pacer is not None else 0.0

    def open(self) -> None:
        self.close()
        if self.kind == "file" and not Path(self._target).is_file():
            raise SourceError(f"{self._target}: no such video file")
        if self.kind == "device" and not os.path.exists(self._target):
            raise SourceError(f"{self._target}: no such video device")
        cap = self._capture()
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{redact(self.url)}: cannot open (OpenCV {self._backend_name()})")
        self._cap, self._pacer = cap, None
        if self.kind == "file":
            self._pacer = Pacer(self._file_fps(cap))

    def _capture(self) -> cv2.VideoCapture:
        if self.kind == "device":
            # OpenCV's V4L2 backend takes no timeout parameters (it refuses to open with them); its
            # select() waits OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT seconds (default 10) per frame.
            return cv2.VideoCapture(self._target, cv2.CAP_V4L2)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
        return cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, params)

    def _backend_name(self) -> str:
        return "V4L2" if self.kind == "device" else "FFmpeg"

    @staticmethod
    def _file_fps(cap: cv2.VideoCapture) -> float:
        fps = cap.get(cv2.CAP_PROP_FPS)
        return fps if 0.1 <= fps <= 1000 else DEFAULT_FILE_FPS

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        if self._cap is None:
            raise SourceError(f"{redact(self.url)}: read before open")
        if self._pacer is not None and not self._pacer.wait(timeout_s):
            return None
        # grab() demuxes and decodes; retrieve() converts to BGR: a frame the fps_limit drops is only grabbed.
        ok = self._cap.grab()
        if not ok and self.kind == "file":
            ok = self._rewind(self._cap)
        if not ok:
            raise SourceError(f"{redact(self.url)}: read failed (stream ended or timed out)")
        if self.kind == "stream":
            self._check_timestamp(self._cap.get(cv2.CAP_PROP_PTS))
        if time.monotonic() < skip_before:
            return SKIPPED
        ok, image = self._cap.retrieve()
        if not ok or image is None:  # grabbed but not decodable: one frame dropped (counted), not the camera
            raise DecodeError(f"{redact(self.url)}: a frame that does not decode")
        return to_rgb(image)

    def _check_timestamp(self, pts: float) -> None:
        """Warn once per source when two frames in a row share a timestamp: slices returned as frames."""
        repeated, self._last_pts = pts >= 0 and pts == self._last_pts, pts
        if repeated and not self._warned_slices:
            self._warned_slices = True
            log.warning(
                "camera %s: frames with the same timestamp: the camera sends several H.264 slices per "
                'frame, which OpenCV returns as torn frames; use backend = "gstreamer" (the gstreamer '
                "extra) or set the camera to one slice per frame",
                self.camera,
            )

    def _rewind(self, cap: cv2.VideoCapture) -> bool:
        """End of file: play `cap` again from the start (seek; reopen if the container cannot seek); grabbed."""
        if not self.loop:
            raise EndOfStream(f"{self._target}: end of video file")
        if cap.set(cv2.CAP_PROP_POS_FRAMES, 0) and cap.grab():
            return True
        cap.release()
        self._cap = cap = self._capture()
        return cap.isOpened() and cap.grab()

    def close(self) -> None:
        cap, self._cap, self._last_pts = self._cap, None, None
        if cap is not None:
            cap.release()
