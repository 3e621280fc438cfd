"""GStreamer sources through PyGObject: any pipeline ending in an appsink, or built from a URL.

pip's OpenCV has no GStreamer backend, so pipelines run in-process through `gi.repository.Gst`
(imported lazily: the `gstreamer` extra). The appsink keeps only the newest buffer
(`max-buffers=1 drop=true`), does not sync to the clock for live sources (`sync=false`) and is
pulled with `try_pull_sample(timeout)`, so a read never blocks longer than the worker asks. Bus
ERROR messages and EOS become SourceError / EndOfStream; WARNING messages are logged.

Pipelines:
- `pipeline = "..."` with an appsink: that appsink (caps preferring RGB added if it has none);
  without one: `! videoconvert ! video/x-raw,format=RGB ! appsink` is appended.
- `url = "rtsp://..."` (`backend = "gstreamer"`, or `auto` when the RTSP elements are installed):
  `rtspsrc location=URL latency=0 protocols=tcp tcp-timeout=<open_timeout_s> ! decodebin !
  videoconvert ! appsink`. RTP over the RTSP connection, as OpenCV's FFmpeg path asks first
  (`rtsp_flags=prefer_tcp`): no lost packets smearing frames, and it passes firewalls and NAT.
  `v4l2:///dev/videoN`: `v4l2src`; a file: `filesrc ! decodebin`, paced
  by the pipeline clock (`sync=true`) and looped by seeking back to the start.
"""

from __future__ import annotations

__all__ = ["GstSource", "pipeline_for", "import_gst", "rtsp_missing", "RTSP_ELEMENTS"]

import logging
import re
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from inspectd.config import CameraConfig
from inspectd.sources.base import SKIPPED, EndOfStream, Skipped, SourceError, redact

log = logging.getLogger("inspectd.sources")
SINK_NAME = "inspectd_sink"
# RGB first so negotiation picks it whenever upstream can; the others are accepted (and converted
# here) so that a pipeline forcing, say, BGRx before its appsink still works.
_FORMATS = {  # format -> (bytes per pixel, index of R, G, B within the pixel)
    "RGB": (3, (0, 1, 2)),
    "BGR": (3, (2, 1, 0)),
    "RGBx": (4, (0, 1, 2)),
    "BGRx": (4, (2, 1, 0)),
    "RGBA": (4, (0, 1, 2)),
    "BGRA": (4, (2, 1, 0)),
    "xRGB": (4, (1, 2, 3)),
    "xBGR": (4, (3, 2, 1)),
    "ARGB": (4, (1, 2, 3)),
    "ABGR": (4, (3, 2, 1)),
    "GRAY8": (1, (0, 0, 0)),
}
_SINK_CAPS = f"video/x-raw,format=(string){{{','.join(_FORMATS)}}}"
_INSTALL_HINT = (
    "GStreamer pipelines need PyGObject: pip install 'inspectd[gstreamer]' (Debian: apt install "
    "libgirepository1.0-dev libcairo2-dev gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav)"
)
_HAS_APPSINK = re.compile(r"(^|!)\s*appsink\b")
_init_lock = threading.Lock()
_gst = None


def import_gst():
    """(Gst, GstVideo), initialised once; SourceError naming the extra and the packages if missing."""
    global _gst
    with _init_lock:
        if _gst is None:
            _tensorflow_first()
            try:
                import gi

                gi.require_version("Gst", "1.0")
                gi.require_version("GstApp", "1.0")
                gi.require_version("GstVideo", "1.0")
                from gi.repository import Gst, GstApp, GstVideo  # noqa: F401 - GstApp adds appsink methods
            except (ImportError, ValueError) as exc:
                raise SourceError(f"{_INSTALL_HINT}: {exc}") from None
            Gst.init(None)
            _gst = (Gst, GstVideo)
    return _gst


def _tensorflow_first() -> None:
    """Import TensorFlow (if installed) before GStreamer: the other order kills the process when TensorFlow is
    imported later (SIGSEGV, measured with TensorFlow 2.21 and Debian 12's GStreamer 1.22; GStreamer after
    TensorFlow is fine). The daemon loads its model first anyway; this covers tools and tests that open a
    camera before anything imports TensorFlow. It costs that import (seconds) once per such process."""
    import importlib.util
    import sys

    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is not None:
        from inspectd.tfload import import_tensorflow

        import_tensorflow()


# What `backend = "auto"` needs before it reads rtsp:// through GStreamer, and the Debian package of each.
RTSP_ELEMENTS = {
    "rtspsrc": "gstreamer1.0-plugins-good",
    "decodebin": "gstreamer1.0-plugins-base",
    "avdec_h264": "gstreamer1.0-libav",
}  # libav decodes H.265 too


def rtsp_missing() -> str | None:
    """Why the GStreamer RTSP path cannot run here (PyGObject or an element missing), or None if it can."""
    try:
        Gst, _ = import_gst()
    except SourceError as exc:
        return str(exc)
    missing = [f"{name} ({package})" for name, package in RTSP_ELEMENTS.items() if Gst.ElementFactory.find(name) is None]
    return f"GStreamer element(s) not installed: {', '.join(missing)}" if missing else None


def _quote(value: str) -> str:
    """A property value for gst-launch syntax (spaces, '!' and quotes inside stay literal)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pipeline_for(cfg: CameraConfig) -> tuple[str, bool]:
    """(launch line, is_file) for a camera: its own pipeline, or one built from its URL."""
    if cfg.pipeline:
        return cfg.pipeline, False
    url = cfg.url or ""
    parts = urlsplit(url)
    if parts.scheme in ("rtsp", "rtsps"):
        timeout_us = max(1, round(cfg.open_timeout_s * 1e6))
        return (
            f"rtspsrc location={_quote(url)} latency=0 protocols=tcp tcp-timeout={timeout_us} ! decodebin ! "
            "videoconvert ! appsink"
        ), False
    if parts.scheme == "v4l2":
        return f"v4l2src device={_quote(unquote(parts.netloc + parts.path))} ! videoconvert ! appsink", False
    path = unquote(parts.netloc + parts.path) if parts.scheme == "file" else url
    return f"filesrc location={_quote(path)} ! decodebin ! videoconvert ! appsink", True


def _find_appsink(pipeline):
    """The pipeline's appsink, or None (a plain Gst.Iterator walk: PyGObject alone has no `for` over it)."""
    Gst, _ = import_gst()
    it = pipeline.iterate_recurse()
    while True:
        result, element = it.next()
        if result == Gst.IteratorResult.RESYNC:
            it.resync()
        elif result != Gst.IteratorResult.OK:
            return None
        elif (factory := element.get_factory()) is not None and factory.get_name() == "appsink":
            return element


class GstSource:
    """A GStreamer pipeline whose appsink delivers the frames."""

    def __init__(self, cfg: CameraConfig):
        self.launch, self.is_file = pipeline_for(cfg)
        self.loop, self.camera = cfg.loop, cfg.id
        self.name = redact(cfg.url or cfg.pipeline or "")
        # A Gst.Pipeline and its appsink while open (gi ships no type stubs: Any).
        self._pipeline: Any = None
        self._sink: Any = None

    def _parse(self, launch: str):
        Gst, _ = import_gst()
        try:
            pipeline = Gst.parse_launch(launch)
        except Exception as exc:  # GLib.Error: no such element, syntax error, ...
            raise SourceError(f"pipeline {redact(launch)!r}: {getattr(exc, 'message', exc)}") from None
        if not isinstance(pipeline, Gst.Pipeline):
            raise SourceError(f"pipeline {redact(launch)!r}: needs a source element and a sink")
        return pipeline

    def _build(self):
        """Parse the pipeline (with a converter and an appsink appended when it has no appsink)."""
        launch = self.launch
        if not _HAS_APPSINK.search(launch):  # decided on the text: a trailing caps filter does not parse alone
            launch = f"{launch} ! videoconvert ! video/x-raw,format=RGB ! appsink name={SINK_NAME}"
        pipeline = self._parse(launch)
        sink = _find_appsink(pipeline)
        if sink is None:
            raise SourceError(f"pipeline {redact(launch)!r}: no appsink element")
        Gst, _ = import_gst()
        if sink.get_property("caps") is None:
            sink.set_property("caps", Gst.Caps.from_string(_SINK_CAPS))
        sink.set_property("max-buffers", 1)
        sink.set_property("drop", True)
        sink.set_property("emit-signals", False)
        sink.set_property("sync", self.is_file)  # files: the clock paces playback like a camera
        return pipeline, sink

    def open(self) -> None:
        self.close()
        Gst, _ = import_gst()
        self._pipeline, self._sink = self._build()
        if self._pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            try:
                self._drain_bus()  # raises with the element's own message when there is one
                raise SourceError(f"{self.name}: state change to PLAYING failed")
            finally:
                self.close()

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        if self._sink is None:
            raise SourceError(f"{self.name}: read before open")
        Gst, _ = import_gst()
        sample = self._sink.try_pull_sample(max(0, int(timeout_s * Gst.SECOND)))
        self._drain_bus()
        if sample is not None:
            # Decoded and converted already (GStreamer's threads); skipped: no copy out of the buffer.
            return SKIPPED if time.monotonic() < skip_before else _to_rgb(sample)
        # try_pull_sample returns at once after EOS: the appsink knows before the bus message comes.
        if self._sink.is_eos():
            self._end_of_stream()
        return None

    def _drain_bus(self) -> None:
        """Empty the bus (it has no watch, so nothing else does): ERROR raises, WARNING is logged."""
        Gst, _ = import_gst()
        bus = self._pipeline.get_bus()
        while (msg := bus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.WARNING)) is not None:
            if msg.type == Gst.MessageType.ERROR:
                err, _debug = msg.parse_error()
                raise SourceError(f"{self.name}: {msg.src.get_name()}: {redact(err.message)}")
            warning, _debug = msg.parse_warning()
            log.warning("camera %s: %s: %s", self.camera, msg.src.get_name(), redact(warning.message))

    def _end_of_stream(self) -> None:
        """A file that ended plays again (loop) or ends the camera; any other pipeline ending is a failure."""
        Gst, _ = import_gst()
        if not self.is_file:
            raise SourceError(f"{self.name}: end of stream")
        if not self.loop:
            raise EndOfStream(f"{self.name}: end of video file")
        if not self._pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0):
            raise SourceError(f"{self.name}: cannot seek back to the start")

    def close(self) -> None:
        pipeline, self._pipeline, self._sink = self._pipeline, None, None
        if pipeline is not None:
            Gst, _ = import_gst()
            pipeline.set_state(Gst.State.NULL)


def _to_rgb(sample) -> np.ndarray:
    """An appsink sample -> HxWx3 RGB uint8 (copied out of the buffer; row padding removed)."""
    _, GstVideo = import_gst()
    caps = sample.get_caps()
    fmt = caps.get_structure(0).get_value("format")
    if fmt not in _FORMATS:
        raise SourceError(f"appsink delivered {fmt}; add 'videoconvert ! video/x-raw,format=RGB' before the appsink")
    info = GstVideo.VideoInfo.new_from_caps(caps)
    w, h, stride = info.width, info.height, info.stride[0]
    buf = sample.get_buffer()
    # extract_dup is our own copy (read-only bytes; nothing downstream writes into a frame): RGB without row
    # padding, what the URL-built pipelines deliver, needs no second one.
    data = np.frombuffer(buf.extract_dup(0, buf.get_size()), np.uint8)
    bpp, rgb = _FORMATS[fmt]
    pixels = data[: h * stride].reshape(h, stride)[:, : w * bpp].reshape(h, w, bpp)
    if bpp == 1:
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_GRAY2RGB)
    if rgb == (0, 1, 2) and bpp == 3 and stride == w * 3:
        return pixels
    # A basic slice (a view), then one contiguous copy: several times faster than picking channels by a list.
    step = 1 if rgb[0] < rgb[2] else -1
    return np.ascontiguousarray(pixels[:, :, slice(rgb[0], rgb[2] + step if rgb[2] + step >= 0 else None, step)])
