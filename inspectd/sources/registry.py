"""Which Source reads a camera: one explicit table keyed by the kind of input and the backend.

`backend = "auto"` takes the first backend of the kind, except for rtsp://: GStreamer when its RTSP
elements are installed, else OpenCV. Measured (benchmarks/rtsp_backends.py): GStreamer decodes
multi-slice H.264 whole where OpenCV tears about half of the frames; its reads can be interrupted,
so a stalled or half-open stream is noticed after `stall_timeout_s` (an OpenCV read blocks for about
3x its timeout); and it follows a resolution change, which OpenCV stretches into the first size.
rtsps:// stays with OpenCV: GStreamer validates the camera's TLS certificate, FFmpeg does not, and
cameras' certificates are mostly self-signed.
"""

from __future__ import annotations

__all__ = ["open_source", "source_kind", "auto_backend"]

import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from inspectd.config import CameraConfig
from inspectd.sources.base import Source, SourceError, redact
from inspectd.sources.folder import FolderSource
from inspectd.sources.genicam import GenicamSource
from inspectd.sources.gstreamer import GstSource, rtsp_missing
from inspectd.sources.opencv import OpenCVSource
from inspectd.sources.synthetic import SyntheticSource

# URL scheme -> kind of input. A plain path is a video file, or a folder of images if it is one.
_KIND_BY_SCHEME = {
    "rtsp": "stream",
    "rtsps": "stream",
    "file": "file",
    "": "file",
    "v4l2": "device",
    "dir": "folder",
    "synthetic": "synthetic",
    "genicam": "genicam",
}
log = logging.getLogger("inspectd.sources")
# Backend "auto" resolves to the first backend of each kind (for rtsp://: see auto_backend).
_BACKENDS = {
    "stream": ("opencv", "gstreamer"),
    "file": ("opencv", "gstreamer"),
    "device": ("opencv", "gstreamer"),
    "pipeline": ("gstreamer",),
    "folder": ("builtin",),
    "synthetic": ("builtin",),
    "genicam": ("builtin",),
}
_FACTORIES: dict[tuple[str, str], Callable[[CameraConfig], Source]] = {
    ("stream", "opencv"): OpenCVSource,
    ("file", "opencv"): OpenCVSource,
    ("device", "opencv"): OpenCVSource,
    ("stream", "gstreamer"): GstSource,
    ("file", "gstreamer"): GstSource,
    ("device", "gstreamer"): GstSource,
    ("pipeline", "gstreamer"): GstSource,
    ("folder", "builtin"): FolderSource,
    ("synthetic", "builtin"): SyntheticSource,
    ("genicam", "builtin"): GenicamSource,
}


def source_kind(cfg: CameraConfig) -> str:
    """stream | file | device | folder | synthetic | genicam | pipeline; SourceError for an unknown URL scheme."""
    if cfg.pipeline is not None:
        return "pipeline"
    url = cfg.url or ""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _KIND_BY_SCHEME:
        raise SourceError(
            f"{redact(url)}: unsupported URL scheme {scheme!r}; expected rtsp://, rtsps://, a video "
            "file, v4l2:///dev/videoN, dir:///path, genicam://DEVICE or synthetic://"
        )
    kind = _KIND_BY_SCHEME[scheme]
    return "folder" if kind == "file" and scheme == "" and Path(url).is_dir() else kind


_decide_lock = threading.Lock()  # capture threads open their sources concurrently


def _stream_backend() -> str:
    with _decide_lock:
        return _decide_stream_backend()


@functools.cache  # decided once per process, and said once in the log
def _decide_stream_backend() -> str:
    missing = rtsp_missing()
    if missing is None:
        return "gstreamer"
    log.info('rtsp:// cameras with backend = "auto" are read with OpenCV (FFmpeg): %s', missing)
    return "opencv"


def auto_backend(cfg: CameraConfig, kind: str) -> str:
    """The backend `backend = "auto"` picks for a camera of this kind."""
    if kind == "stream" and urlsplit(cfg.url or "").scheme.lower() == "rtsp":
        return _stream_backend()
    return _BACKENDS[kind][0]


def open_source(cfg: CameraConfig) -> Source:
    """Build (not yet open) the Source for a camera; SourceError if the kind/backend pair does not exist."""
    kind = source_kind(cfg)
    backends = _BACKENDS[kind]
    backend = auto_backend(cfg, kind) if cfg.backend == "auto" or backends == ("builtin",) else cfg.backend
    factory = _FACTORIES.get((kind, backend))
    if factory is None:
        raise SourceError(f"camera {cfg.id!r}: backend {cfg.backend!r} cannot read a {kind} (use {' or '.join(backends)})")
    return factory(cfg)
