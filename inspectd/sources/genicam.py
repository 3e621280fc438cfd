"""`genicam://DEVICE?...`: an industrial camera (GigE Vision, USB3 Vision) through Aravis.

Aravis (Debian's `gir1.2-aravis-0.8`, through PyGObject: the `gstreamer` extra) speaks GenICam:
GVCP/GVSP over UDP for GigE Vision. DEVICE is the camera's Aravis id as `arv-tool-0.8` lists it
("Basler-21234567"), its serial number or its IP address; empty = the first camera found.

    genicam://Basler-21234567?trigger=software&exposure_us=800&gain=2&pixel_format=BayerRG8

Parameters (docs/cameras.md#genicam-cameras-gige-vision-usb3-vision has the table):
- `trigger`: `off` (free running, the default), `software` (one image per software trigger) or a
  hardware input, `Line0`, `Line1`, ... (one image per edge);
- `trigger_fps`: with `software`, fire this many triggers a second (0: only those asked for);
- `exposure_us`, `gain`, `pixel_format`, `region` (x,y,w,h on the sensor), `frame_rate` (free
  running): the camera's own unless given;
- `buffers` (8): image buffers queued to the stream; `packet_size` (0: negotiated, jumbo frames
  when the path takes them).

Every image a camera sends is accounted for: an incomplete buffer (lost packets, a timeout) is a
frame dropped with reason `incomplete`, an image the camera sent while no buffer was free is one
too (the stream's underruns), and a software trigger the camera never answered within
`stall_timeout_s` is a frame dropped with reason `camera` (in part mode: a `not_inspected` part).
A camera that stops answering is noticed by Aravis' heartbeat (`control-lost`) or by the stall
timeout, and reconnected as an RTSP camera is. In part mode a part's id is the camera's frame id
and timestamp, `FRAMEID@TIMESTAMP_NS`, and its `trigger_at` the time its software trigger fired.
"""

from __future__ import annotations

__all__ = ["GenicamSource", "import_aravis", "debayer_code"]

import logging
import threading
import time
from collections import deque
from typing import Any, TypedDict
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from inspectd.config import CameraConfig
from inspectd.frames import DropReason
from inspectd.sources.base import SKIPPED, DecodeError, Pacer, Skipped, SourceError, Trigger, query_params

log = logging.getLogger("inspectd.sources")


class _Params(TypedDict):
    trigger: str
    trigger_fps: float
    exposure_us: str
    gain: str
    pixel_format: str
    region: str
    frame_rate: str
    buffers: int
    packet_size: int


_DEFAULTS: _Params = {
    "trigger": "off",
    "trigger_fps": 0.0,
    "exposure_us": "",
    "gain": "",
    "pixel_format": "",
    "region": "",
    "frame_rate": "",
    "buffers": 8,
    "packet_size": 0,
}
_INSTALL_HINT = (
    "genicam:// cameras need Aravis through PyGObject: pip install 'inspectd[gstreamer]' and apt install "
    "gir1.2-aravis-0.8 (aravis-tools-cli for arv-tool-0.8)"
)
# GenICam names the first two pixels of the first row; OpenCV's Bayer codes name the second row's.
_DEBAYER = {
    "BayerRG8": cv2.COLOR_BayerBG2RGB,
    "BayerBG8": cv2.COLOR_BayerRG2RGB,
    "BayerGR8": cv2.COLOR_BayerGB2RGB,
    "BayerGB8": cv2.COLOR_BayerGR2RGB,
}
FORMATS = ("Mono8", "Mono16", "RGB8", "BGR8", *_DEBAYER)
_TRIGGER_POLL_S = 0.01
_NO_TIMER = 1e9  # period_s of a camera triggered from outside: silence between parts is not a stall

_aravis_lock = threading.Lock()
_aravis: Any = None


def import_aravis():
    """The Aravis module (GObject introspection), once; SourceError naming what to install if missing."""
    global _aravis
    with _aravis_lock:
        if _aravis is None:
            from inspectd.sources.gstreamer import _tensorflow_first

            _tensorflow_first()  # as for GStreamer: a GObject library loaded before TensorFlow can crash its import
            try:
                import gi

                gi.require_version("Aravis", "0.8")
                from gi.repository import Aravis
            except (ImportError, ValueError) as exc:
                raise SourceError(f"{_INSTALL_HINT}: {exc}") from None
            _aravis = Aravis
    return _aravis


def debayer_code(pixel_format: str) -> int | None:
    """The OpenCV conversion of a GenICam Bayer format to RGB (None: not a Bayer format)."""
    return _DEBAYER.get(pixel_format)


def to_rgb(data: bytes, width: int, height: int, pixel_format: str) -> np.ndarray:
    """A GenICam image buffer -> HxWx3 RGB uint8 (a copy: the buffer goes back to the camera at once)."""
    if pixel_format == "Mono16":
        gray = (np.frombuffer(data, np.uint16, width * height).reshape(height, width) >> 8).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if pixel_format in ("RGB8", "BGR8"):
        image = np.frombuffer(data, np.uint8, width * height * 3).reshape(height, width, 3)
        return image.copy() if pixel_format == "RGB8" else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    plane = np.frombuffer(data, np.uint8, width * height).reshape(height, width)
    code = debayer_code(pixel_format)
    return cv2.cvtColor(plane, cv2.COLOR_GRAY2RGB if code is None else code)


def _region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise SourceError(f"region={text!r}: expected x,y,w,h (four integers)") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise SourceError(f"region={text!r}: x, y >= 0 and w, h > 0 expected")
    return x, y, w, h


def _number(name: str, text: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise SourceError(f"{name}={text!r}: not a number") from None


class GenicamSource:
    """One GenICam camera through Aravis: open, read images (or trigger and read), close."""

    def __init__(self, cfg: CameraConfig):
        url = cfg.url or ""
        parts = urlsplit(url)
        self.url = url
        self.device = unquote(parts.netloc + parts.path.lstrip("/")) or None
        self.params = query_params(url, _DEFAULTS)
        p = self.params
        trigger = str(p["trigger"])
        if trigger.lower() in ("off", "software"):
            trigger = trigger.lower()
        self.trigger = trigger
        if p["trigger_fps"] < 0 or (p["trigger_fps"] and trigger != "software"):
            raise SourceError(f"{url}: trigger_fps needs trigger=software and a rate >= 0")
        if p["pixel_format"] and p["pixel_format"] not in FORMATS:
            raise SourceError(f"{url}: pixel_format {p['pixel_format']!r} is not one of {', '.join(FORMATS)}")
        if not 2 <= p["buffers"] <= 256:
            raise SourceError(f"{url}: buffers must be 2-256")
        self._region = _region(p["region"]) if p["region"] else None
        self._exposure, self._gain = _number("exposure_us", p["exposure_us"]), _number("gain", p["gain"])
        self._frame_rate = _number("frame_rate", p["frame_rate"])
        self._stall_s = cfg.stall_timeout_s
        self._timer = Pacer(p["trigger_fps"]) if p["trigger_fps"] else None
        self._camera: Any = None
        self._stream: Any = None
        self._format = ""
        self._control_lost = threading.Event()
        self._triggers: deque[Trigger] = deque()  # software triggers not answered yet, oldest first
        self._lost: deque[tuple[DropReason, str, Trigger | None]] = deque()  # lost images (and their triggers), one per read
        self._underruns = 0
        self.part_id: str | None = None  # the last image's camera frame id and timestamp
        self.trigger_at: float | None = None  # the last image's software trigger (wall clock), if any

    @property
    def waits_for_triggers(self) -> bool:
        """Triggered from outside only (a hardware line, the trigger endpoint): open is UP, silence is no stall."""
        return self.trigger != "off" and self._timer is None

    @property
    def period_s(self) -> float:
        """Triggered from outside (a line, the trigger endpoint): silence between parts is no stall."""
        if self.trigger == "off":
            return 0.0
        return self._timer.period if self._timer is not None else _NO_TIMER

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        Aravis = import_aravis()
        self._control_lost.clear()
        try:
            Aravis.update_device_list()
            self._camera = camera = Aravis.Camera.new(self.device)
        except Exception as exc:  # GLib.Error: not found, not reachable, in use by another controller
            raise SourceError(f"genicam://{self.device or ''}: cannot open the camera: {_message(exc)}") from None
        try:
            self._configure(camera)
            if camera.is_gv_device():
                camera.get_device().connect("control-lost", lambda device: self._control_lost.set())
            self._stream = stream = camera.create_stream(None, None)
            size = camera.get_payload()
            for _ in range(int(self.params["buffers"])):
                stream.push_buffer(Aravis.Buffer.new_allocate(size))
            self._underruns = _statistics(Aravis, stream)[2]
            camera.start_acquisition()
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"genicam://{self.device or ''}: cannot start acquisition: {_message(exc)}") from None
        if self._timer is not None:
            self._timer.reset()
        log.info(
            "genicam %s: %s %s, %s, trigger %s", self.device or "(first found)", camera.get_vendor_name(),
            camera.get_model_name(), self._format, self.trigger,
        )  # fmt: skip

    def _configure(self, camera) -> None:
        p = self.params
        if p["pixel_format"]:
            available = camera.dup_available_pixel_formats_as_strings() or []
            if p["pixel_format"] not in available:
                raise SourceError(f"{self.url}: the camera has no pixel format {p['pixel_format']} ({', '.join(available)})")
            camera.set_pixel_format_from_string(p["pixel_format"])
        self._format = camera.get_pixel_format_as_string()
        if self._format not in FORMATS:
            raise SourceError(
                f"{self.url}: pixel format {self._format} is not supported; set pixel_format= to one of {', '.join(FORMATS)}"
            )
        if self._region is not None:
            camera.set_region(*self._region)
        if self._exposure is not None:
            if camera.is_exposure_auto_available():
                camera.set_exposure_time_auto(0)  # ARV_AUTO_OFF
            camera.set_exposure_time(self._exposure)
        if self._gain is not None:
            camera.set_gain(self._gain)
        if camera.is_gv_device():
            if p["packet_size"]:
                camera.gv_set_packet_size(int(p["packet_size"]))
            else:
                camera.gv_auto_packet_size()
        if self.trigger == "off":
            camera.clear_triggers()
            camera.set_acquisition_mode(1)  # ARV_ACQUISITION_MODE_CONTINUOUS
            if self._frame_rate is not None:
                camera.set_frame_rate(self._frame_rate)
        elif self.trigger == "software":
            if not camera.is_software_trigger_supported():
                raise SourceError(f"{self.url}: the camera has no software trigger")
            camera.set_trigger("Software")
        else:
            sources = camera.dup_available_trigger_sources() or []
            if self.trigger not in sources:
                raise SourceError(f"{self.url}: trigger {self.trigger!r} is not one of the camera's: {', '.join(sources)}")
            camera.set_trigger(self.trigger)

    def close(self) -> None:
        camera, self._camera, self._stream = self._camera, None, None
        if camera is not None:
            try:
                camera.stop_acquisition()
            except Exception:  # the camera is gone: nothing to stop
                pass

    def abandon(self) -> list[Trigger]:
        """Software triggers that will never get their image (the session ended), oldest first."""
        left = list(self._triggers)
        self._triggers.clear()
        return left

    # -- reading -------------------------------------------------------------------------------
    def fire(self, trigger: Trigger | None = None) -> Trigger:
        """Fire one software trigger now (for `trigger`, a part asked for from outside, or one of the timer's).
        A trigger the camera refuses is still a part asked for: it stays pending (SourceError; `abandon` then
        hands it to the worker)."""
        if self._camera is None:
            raise SourceError("genicam: not open")
        trigger = trigger or Trigger(time.time(), time.monotonic())
        self._triggers.append(trigger)
        try:
            self._camera.software_trigger()
        except Exception as exc:
            raise SourceError(f"genicam://{self.device or ''}: software trigger failed: {_message(exc)}") from None
        return trigger

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        if self._control_lost.is_set():
            raise SourceError("control lost: the camera stopped answering its heartbeat")
        self._check_losses()
        if self._lost:
            reason, message, trigger = self._lost.popleft()
            # No image, no frame id: the part is known by its trigger's id, or else its capture number.
            self.part_id = trigger.part_id if trigger is not None else None
            self.trigger_at = trigger.at if trigger is not None else None
            raise DecodeError(message, reason=reason)
        if self._timer is not None and self._timer.wait(0.0):
            self.fire()
        stream = self._stream
        if stream is None:
            raise SourceError("genicam: not open")
        # Triggered by software: short waits, so a trigger asked for meanwhile is fired within _TRIGGER_POLL_S.
        wait_s = min(timeout_s, _TRIGGER_POLL_S) if self.trigger == "software" else timeout_s
        buffer = stream.timeout_pop_buffer(max(1, int(wait_s * 1e6)))
        if buffer is None:
            return None
        try:
            return self._image(buffer, skip_before)
        finally:
            stream.push_buffer(buffer)

    def _image(self, buffer, skip_before: float) -> np.ndarray | Skipped:
        Aravis = import_aravis()
        trigger = self._triggers.popleft() if self._triggers else None
        self.trigger_at = trigger.at if trigger is not None else None
        status = buffer.get_status()
        self.part_id = (trigger.part_id if trigger is not None else None) or f"{buffer.get_frame_id()}@{buffer.get_timestamp()}"
        if status != Aravis.BufferStatus.SUCCESS:
            name = getattr(status, "value_nick", str(status))
            raise DecodeError(f"incomplete image {self.part_id}: {name}", reason=DropReason.INCOMPLETE)
        if time.monotonic() < skip_before:
            return SKIPPED
        return to_rgb(buffer.get_data(), buffer.get_image_width(), buffer.get_image_height(), self._format)

    def _check_losses(self) -> None:
        """Images the camera sent without a free buffer, and triggers it never answered: each a frame lost."""
        stream = self._stream
        if stream is not None:
            underruns = _statistics(import_aravis(), stream)[2]
            for _ in range(underruns - self._underruns):
                trigger = self._triggers.popleft() if self._triggers else None
                self._lost.append((DropReason.INCOMPLETE, "an image arrived while no buffer was free (underrun)", trigger))
            self._underruns = underruns
        limit = time.monotonic() - self._stall_s
        while self._triggers and self._triggers[0].mono < limit:
            trigger = self._triggers.popleft()
            self._lost.append((DropReason.CAMERA, f"no image {self._stall_s:g} s after a software trigger", trigger))


def _statistics(Aravis, stream) -> tuple[int, int, int]:
    """(completed, failures, underruns): the base Stream's counters (GvStream's own method returns others)."""
    completed, failures, underruns = Aravis.Stream.get_statistics(stream)
    return int(completed), int(failures), int(underruns)


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__
