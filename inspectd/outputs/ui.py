"""The operator's live view over HTTP ([ui], docs/live-view.md): a page, live MJPEG streams, recent defects,
frame collection.

    app = UiApp(live, recent, state, collect_dir=Path("/srv/dataset"))
    server = WebServer(app, "127.0.0.1", 8080, web=web_security(settings.ui, "ui"), section="ui", ...)

Routes (GET unless said):
    /                       the page (plain HTML, CSS and a little JavaScript from inspectd/assets/ui)
    /stream?camera=ID       MJPEG (multipart/x-mixed-replace): the camera's live picture, at most [ui] max_fps
    /snapshot?camera=ID     the current picture as one JPEG (the page refreshes tiles beyond its first 4 this way:
                            a browser opens at most 6 connections to a server)
    /api/state              cameras (state, frames/s inspected and dropped, last verdict), model, collection on/off
    /api/defects?camera=ID  recent defect events, newest first
    /api/defect?id=ID       one event's header JSON, as sent
    /defect/{frame,mask,regions,overlay,thumb}?id=ID   its frame, probability mask, regions, the two drawn
                            (overlay&map=probability|relative: that map instead of [ui] map)
    POST /api/collect       {"camera": ID, "label": "ok"|"defect"}: save the camera's current frame for training
    POST /api/collect-defect  {"id": ID[, "mask": PNG]}: save a recent defect's frame with its published regions as
                            its mask, or with the mask the operator painted (base64 PNG, a data URL too, the
                            frame's size, non-zero = defect); both only with [ui] collect_dir, the page's only writes

Safety: read-only but for collection; the page builds every element with textContent and escaped URLs;
camera ids are looked up, never used as paths (file names use `safe_component`); responses carry a
strict Content-Security-Policy. Without basic auth (a loopback address: config.py refuses any other
without users) the Host header must name this machine's loopback, so that a web page elsewhere cannot
reach the view through DNS rebinding. Collection asks for a custom header, which a page on another
site cannot send without a CORS preflight this server never grants.
"""

from __future__ import annotations

__all__ = ["UiApp", "collect_defect", "collect_frame", "defect_overlay", "defect_thumbnail", "STATIC", "MAX_STREAMS"]

import base64
import errno
import ipaddress
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs

import cv2
import numpy as np

from inspectd.drawing import MAP_MODES, SIGMOID_JET, draw, logit_of, logits_of_u8, map_index
from inspectd.imageio import encode_jpeg, encode_png
from inspectd.outputs.archive import safe_component
from inspectd.outputs.live import LiveView, Seen
from inspectd.outputs.recent import DefectLog, DefectRecord
from inspectd.outputs.wire import parse_rfc3339
from inspectd.pipeline.postprocess import overlay

log = logging.getLogger("inspectd.outputs.ui")

STATIC = Path(__file__).resolve().parents[1] / "assets" / "ui"
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/static/live.css": ("live.css", "text/css; charset=utf-8"),
}
MAX_STREAMS = 16  # MJPEG connections at once: each holds a thread
BOUNDARY = "inspectd-frame"
COLLECT_HEADER = "HTTP_X_INSPECTD_COLLECT"  # X-Inspectd-Collect: 1
LABELS = ("ok", "defect")
# A collection request's body, at most: a camera and a label, or an event id with a painted mask (a PNG of a mostly
# empty 4K frame is tens of kB; base64 adds a third).
_MAX_BODY = 4096
_MAX_MASK_BODY = 8 * 1024 * 1024
_MAX_MASK_PIXELS = 8192 * 8192
_DRAWN_BYTES = 32_000_000  # drawings of recent defects kept (a page lists the same ones every poll)
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    ("Content-Security-Policy", _CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}


class HttpError(Exception):
    def __init__(self, status: str, message: str, allow: str = ""):
        super().__init__(message)
        self.status, self.allow = status, allow


# -- frame collection ------------------------------------------------------------------------------


def collect_frame(root: Path, seen: Seen, label: str) -> Path:
    """Save the frame the model saw (after the camera's roi and resize) as ROOT/LABEL/CAMERA_TIME_SEQ.png,
    lossless, written to a temporary name and renamed: a file with an image suffix is always whole."""
    if label not in LABELS:
        raise ValueError(f"label {label!r}: ok or defect expected")
    frame = seen.frame
    path = Path(root) / label / _collected_name(frame.camera, frame.captured_at, frame.seq)
    _write_whole(path, encode_png(frame.image))
    return path


def collect_defect(root: Path, record: DefectRecord, painted: np.ndarray | None = None) -> tuple[Path, Path]:
    """Save a defect event as a training example with its mask: ROOT/defect/NAME.png (its frame) and
    ROOT/masks/NAME.png (its published regions, or the mask the operator `painted` at the frame's size;
    255 = defect), the layout `inspectd train` reads for mask supervision. The mask is written first, so the
    image never appears without it. ValueError when the event kept no frame or has no regions attachment (and
    no painted mask), or when the painted mask is not the frame's size or empty."""
    image = _frame_of(record)
    if image is None:
        raise ValueError("this event kept no frame (publish.attach_frame, or the archive's frames)")
    height, width = image.shape[:2]
    if painted is not None:
        if painted.shape[:2] != (height, width):
            raise ValueError(f"the painted mask is {painted.shape[1]}x{painted.shape[0]}; the frame is {width}x{height}")
        if not painted.any():
            raise ValueError("the painted mask is empty: paint the defect, or save the regions")
    regions = painted if painted is not None else _decode(record.files.get("regions.png", b""), cv2.IMREAD_GRAYSCALE)
    if regions is None:
        raise ValueError("this event has no regions attachment to save as its mask")
    if regions.shape != (height, width):
        regions = cv2.resize(regions, (width, height), interpolation=cv2.INTER_NEAREST)
    h = record.header
    try:
        when = parse_rfc3339(str(h.get("captured_at")))
    except (TypeError, ValueError):  # an unsent event's header may lack it: the save time then names the file
        when = time.time()
    name = _collected_name(str(h.get("camera") or "camera"), when, int(h.get("frame_seq") or 0))
    mask_path, image_path = Path(root) / "masks" / name, Path(root) / "defect" / name
    _write_whole(mask_path, encode_png(np.where(regions > 0, 255, 0).astype(np.uint8)))
    _write_whole(image_path, encode_png(image))
    return image_path, mask_path


def _collected_name(camera: str, captured_at: float, seq: int) -> str:
    when = datetime.fromtimestamp(captured_at, tz=timezone.utc)
    return f"{safe_component(camera)}_{when:%Y%m%dT%H%M%S.%fZ}_{seq}.png"


def _write_whole(path: Path, data: bytes) -> None:
    """Write to a unique temporary name without an image suffix, then rename: `train` never reads a half-written
    file, and two saves of the same frame never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# -- drawing a recent defect -------------------------------------------------------------------------


def _decode(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    if not data:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is not None and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _frame_of(record: DefectRecord) -> np.ndarray | None:
    if record.image is not None:
        return record.image
    for name in ("frame.jpg", "frame.png"):
        if name in record.files:
            return _decode(record.files[name])
    return None


def defect_overlay(record: DefectRecord, map_mode: str = "relative") -> np.ndarray:
    """A defect event drawn as the live view and `watch --save` draw it: frame, map (`map_mode`), regions, verdict."""
    h = record.header
    frame_info = h.get("frame") or {}
    image = _frame_of(record)
    mask = _decode(record.files.get("mask.png", b""), cv2.IMREAD_GRAYSCALE)
    if image is None:  # no frame kept with the event: the map on black
        size = (int(frame_info.get("width") or 320), int(frame_info.get("height") or 240))
        image = np.zeros((size[1], size[0], 3), np.uint8)
    height, width = image.shape[:2]
    prob_u8 = (
        np.zeros((height, width), np.uint8) if mask is None else cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    )
    kept = _decode(record.files.get("regions.png", b""), cv2.IMREAD_GRAYSCALE)
    if kept is not None and kept.shape != (height, width):
        kept = cv2.resize(kept, (width, height), interpolation=cv2.INTER_NEAREST)
    return overlay(
        image,
        logits_of_u8(prob_u8),
        float(h.get("score") or 0.0),
        float(h.get("threshold") or 0.0),
        logit_of(float(h.get("mask_threshold", 0.5))),
        mask=kept,
        regions=tuple(h.get("regions") or ()),
        mode=map_mode,
    )


def defect_thumbnail(record: DefectRecord, width: int = 240, map_mode: str = "relative") -> np.ndarray:
    """A small picture of a defect event: the frame at `width`, the map blended in, the regions' contours and
    boxes; no text or legend (the list says the score; the page shows the legend). Everything is scaled down
    first, in a few OpenCV calls: a page asks for several at once, next to the inspection's own threads."""
    h = record.header
    image = _frame_of(record)
    info = h.get("frame") or {}
    full_w, full_h = (
        (image.shape[1], image.shape[0]) if image is not None else (int(info.get("width") or 320), int(info.get("height") or 240))
    )
    w = min(width, full_w)
    size = (w, max(1, round(full_h * w / full_w)))
    picture = (
        np.zeros((size[1], size[0], 3), np.uint8)
        if image is None
        else cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    )
    mask = _decode(record.files.get("mask.png", b""), cv2.IMREAD_GRAYSCALE)
    kept = _decode(record.files.get("regions.png", b""), cv2.IMREAD_GRAYSCALE)
    scale = size[0] / full_w
    boxes = [tuple(round(v * scale) for v in region["bbox"]) for region in h.get("regions") or ()]
    kept = None if kept is None else cv2.resize(kept, size, interpolation=cv2.INTER_NEAREST)
    heat = (
        None
        if mask is None
        else map_index(
            logits_of_u8(cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)),
            map_mode,
            logit_of(float(h.get("mask_threshold", 0.5))),
            True,  # a defect event
            kept,
        )
    )
    picture = draw(picture, heat, SIGMOID_JET, mask=kept, boxes=boxes, legend=None)
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


# -- rates -----------------------------------------------------------------------------------------


class _Rates:
    """Per-camera rates of counters (frames inspected and dropped per second) over the last few seconds,
    from samples taken when the page asks (at most two a second)."""

    WINDOW_S = 5.0

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()
        self._lock = threading.Lock()

    def update(self, counts: dict[str, tuple[float, float]], now: float | None = None) -> dict[str, tuple[float, float]]:
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self._samples or now - self._samples[-1][0] >= 0.5:
                self._samples.append((now, counts))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
                self._samples.popleft()
            t0, first = self._samples[0]
        dt = now - t0
        out = {}
        for camera, (inspected, dropped) in counts.items():
            before = first.get(camera)
            if before is None or dt < 0.5:
                out[camera] = (0.0, 0.0)
            else:
                out[camera] = (max(0.0, inspected - before[0]) / dt, max(0.0, dropped - before[1]) / dt)
        return out


# -- the application ----------------------------------------------------------------------------------


State = Callable[[], dict]


class UiApp:
    """The WSGI application of the live view.

    `state()` returns {"cameras": [{"id", "state", "detail", "inspected", "dropped", "reconnects"}...], ...}
    (the daemon's view: counters are totals); the rest is added here."""

    def __init__(
        self,
        live: LiveView,
        recent: DefectLog,
        state: State,
        collect_dir: Path | None = None,
        auth: bool = False,
        recent_limit: int = 50,
        host: str = "127.0.0.1",
    ):
        """`host`: the configured bind address; a Host header naming it is accepted too (a name of this PC that
        resolves to loopback)."""
        self.live, self.recent, self.state = live, recent, state
        self.host = host.lower()
        self.collect_dir = collect_dir
        self.auth = auth  # basic auth in front (WebServer): then any Host is fine
        self.recent_limit = recent_limit
        self._rates = _Rates()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._drawn: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._drawn_bytes = 0
        self._drawn_lock = threading.Lock()
        self.collected = 0

    def __call__(self, environ, start_response):
        try:
            if not self.auth and not _loopback_host(environ.get("HTTP_HOST", ""), self.host):
                raise HttpError(
                    "403 Forbidden",
                    "this address is not allowed: open the view as http://localhost:PORT/ "
                    "or http://127.0.0.1:PORT/ (an SSH tunnel for a remote PC)",
                )
            method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
            query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            if path in ("/api/collect", "/api/collect-defect"):
                if method != "POST":
                    raise HttpError("405 Method Not Allowed", "POST only", allow="POST")
                collect = self._collect if path == "/api/collect" else self._collect_defect
                return self._respond(start_response, *collect(environ))
            if method not in ("GET", "HEAD"):
                raise HttpError("405 Method Not Allowed", "GET only", allow="GET, HEAD")
            if path == "/stream":
                return self._stream(start_response, query.get("camera", ""), head=method == "HEAD")
            return self._respond(start_response, *self._get(path, query), head=method == "HEAD")
        except HttpError as exc:
            extra = [("Allow", exc.allow)] if exc.allow else []
            return self._respond(start_response, exc.status, "text/plain; charset=utf-8", f"{exc}\n".encode(), extra=extra)
        except Exception:
            log.exception("live view: request failed")
            return self._respond(
                start_response,
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                b"internal error (see the daemon's log)\n",
            )

    @staticmethod
    def _respond(
        start_response,
        status: str,
        content_type: str,
        body: bytes,
        cache: bool = False,
        head: bool = False,
        extra: list | None = None,
    ):
        """`cache`: the answer never changes for this URL (a defect's files: ids are never reused); `head`: the
        headers only."""
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "private, max-age=3600" if cache else "no-store"),
            *_SECURITY_HEADERS,
            *(extra or []),
        ]
        start_response(status, headers)
        return [] if head else [body]

    # -- GET -----------------------------------------------------------------------------------
    def _get(self, path: str, query: dict[str, str]) -> tuple[str, str, bytes] | tuple[str, str, bytes, bool]:
        if path in _STATIC_FILES:
            name, content_type = _STATIC_FILES[path]
            return "200 OK", content_type, (STATIC / name).read_bytes()
        if path == "/api/state":
            return "200 OK", "application/json", _json(self._state())
        if path == "/snapshot":
            camera = self._camera(query.get("camera", ""))
            return "200 OK", "image/jpeg", self.live.snapshot(camera)
        if path == "/favicon.ico":  # browsers ask for it: no icon, and no error in their console
            return "204 No Content", "image/x-icon", b""
        if path == "/api/defects":
            limit = _int(query.get("limit"), self.recent_limit, 1, self.recent_limit)
            records = self.recent.recent(query.get("camera") or None, limit)
            return "200 OK", "application/json", _json({"defects": [r.summary() for r in records]})
        if path == "/api/defect":
            return "200 OK", "application/json", self._record(query).header_json
        if path.startswith("/defect/"):
            return self._defect_file(path.removeprefix("/defect/"), self._record(query), query)
        raise HttpError("404 Not Found", "no such page")

    def _state(self) -> dict:
        state = self.state()
        cameras = state.get("cameras", [])
        rates = self._rates.update({c["id"]: (c.get("inspected", 0), c.get("dropped", 0)) for c in cameras})
        for c in cameras:
            c["fps"], c["dropped_fps"] = (round(v, 2) for v in rates.get(c["id"], (0.0, 0.0)))
            seen = self.live.latest(c["id"])
            c["last"] = (
                None
                if seen is None
                else {
                    "frame_seq": seen.frame.seq,
                    "score": round(seen.score, 4),
                    "is_defect": seen.is_defect,
                    "threshold": seen.options.threshold,
                    "age_s": round(max(0.0, time.time() - seen.frame.captured_at), 2),
                }
            )
        return {**state, "collect": self.collect_dir is not None, "max_fps": self.live.max_fps, "map": self.live.map_mode}

    def _record(self, query: dict[str, str]) -> DefectRecord:
        record = self.recent.get(query.get("id", ""))
        if record is None:
            raise HttpError("404 Not Found", "no such defect (expired, or from before a restart without the archive)")
        return record

    def _defect_file(self, name: str, record: DefectRecord, query: dict[str, str]) -> tuple[str, str, bytes, bool]:
        if name == "frame":
            for file in ("frame.jpg", "frame.png"):
                if file in record.files:
                    return "200 OK", _CONTENT_TYPES[file[-4:]], record.files[file], True
            image = record.image
            if image is not None:
                return "200 OK", "image/jpeg", self._drawn_once(record, "frame", lambda: encode_jpeg(image, 90)), True
            raise HttpError("404 Not Found", "no frame was kept with this event (publish.attach_frame, archive)")
        if name in ("mask", "regions"):
            data = record.files.get(f"{name}.png")
            if data is None:
                raise HttpError("404 Not Found", f"this event has no {name} attachment")
            return "200 OK", "image/png", data, True
        if name == "overlay":
            mode = query.get("map") or self.live.map_mode
            if mode not in MAP_MODES:
                raise HttpError("400 Bad Request", f"map={mode}: choose {' or '.join(MAP_MODES)}")
            draw_it = lambda: encode_jpeg(defect_overlay(record, mode))  # noqa: E731
            return "200 OK", "image/jpeg", self._drawn_once(record, f"overlay-{mode}", draw_it), True
        if name == "thumb":
            thumb = lambda: encode_jpeg(defect_thumbnail(record, map_mode=self.live.map_mode))  # noqa: E731
            return "200 OK", "image/jpeg", self._drawn_once(record, name, thumb), True
        raise HttpError("404 Not Found", "no such file")

    def _drawn_once(self, record: DefectRecord, kind: str, draw: Callable[[], bytes]) -> bytes:
        key = (record.id, kind)
        with self._drawn_lock:
            if key in self._drawn:
                self._drawn.move_to_end(key)
                return self._drawn[key]
        data = draw()
        with self._drawn_lock:
            if key not in self._drawn:
                self._drawn[key] = data
                self._drawn_bytes += len(data)
            while self._drawn_bytes > _DRAWN_BYTES and len(self._drawn) > 1:
                self._drawn_bytes -= len(self._drawn.popitem(last=False)[1])
        return data

    # -- the MJPEG stream ------------------------------------------------------------------------
    def _camera(self, camera: str) -> str:
        if camera not in {c["id"] for c in self.state().get("cameras", [])}:
            raise HttpError("404 Not Found", "no such camera")
        return camera

    def _stream(self, start_response, camera: str, head: bool = False):
        self._camera(camera)
        if head:  # the headers a GET would get, without opening a stream
            start_response(
                "200 OK",
                [
                    ("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}"),
                    ("Cache-Control", "no-store"),
                    *_SECURITY_HEADERS,
                ],
            )
            return []
        if not self._streams.acquire(blocking=False):
            raise HttpError("503 Service Unavailable", f"{MAX_STREAMS} live streams open already")
        start_response(
            "200 OK",
            [
                ("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}"),
                ("Cache-Control", "no-store"),
                *_SECURITY_HEADERS,
            ],
        )
        return _Stream(self._parts(camera), self._streams.release)

    def _parts(self, camera: str) -> Generator[bytes, None, None]:
        pictures = self.live.stream(camera)
        try:
            for jpeg in pictures:
                yield (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n"
                )
        finally:  # the viewer went away (the write failed), or the daemon stops: stop watching now
            pictures.close()

    # -- collection ------------------------------------------------------------------------------
    def _collect_request(self, environ, expected: str, limit: int = _MAX_BODY) -> dict:
        """The JSON body of a collection request (collection on, the custom header present, at most `limit`
        bytes), or HttpError."""
        if self.collect_dir is None:
            raise HttpError("404 Not Found", "frame collection is off (set [ui] collect_dir)")
        if environ.get(COLLECT_HEADER) != "1":
            raise HttpError("403 Forbidden", "collection needs the header X-Inspectd-Collect: 1 (the page sends it)")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length > limit:
                raise HttpError("413 Content Too Large", f"the body is {length} bytes; at most {limit}")
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            if len(body) < length:
                raise HttpError("400 Bad Request", f"the body ended after {len(body)} of its {length} bytes")
            request = json.loads(body)
            if not isinstance(request, dict):
                raise TypeError
            return request
        except OSError:  # the client sent less than its Content-Length and waits: the read timed out
            raise HttpError(
                "400 Bad Request", f"the body did not arrive ({environ.get('CONTENT_LENGTH')} bytes announced)"
            ) from None
        except (ValueError, TypeError, RecursionError):
            raise HttpError("400 Bad Request", f"expected JSON {expected}") from None

    def _save_failed(self, exc: OSError) -> HttpError:
        log.error("live view: cannot save into %s: %s", self.collect_dir, exc)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return HttpError(
            "507 Insufficient Storage" if full else "500 Internal Server Error",
            f"cannot save into [ui] collect_dir: {exc.strerror or exc}",
        )

    def _collect(self, environ) -> tuple[str, str, bytes]:
        expected = '{"camera": ID, "label": "ok" | "defect"}'
        request = self._collect_request(environ, expected)
        try:
            camera, label = str(request["camera"]), str(request["label"])
        except KeyError:
            raise HttpError("400 Bad Request", f"expected JSON {expected}") from None
        if label not in LABELS:
            raise HttpError("400 Bad Request", f"label {label!r}: ok or defect expected")
        self._camera(camera)
        seen = self.live.shown(camera)  # the frame on the operator's screen, not a newer one
        if seen is None:
            raise HttpError("409 Conflict", "this camera has no inspected frame yet")
        assert self.collect_dir is not None  # _collect_request checked
        try:
            path = collect_frame(self.collect_dir, seen, label)
        except OSError as exc:
            raise self._save_failed(exc) from None
        self.collected += 1
        log.info("live view: saved camera %s frame %d as %s: %s", camera, seen.frame.seq, label, path)
        return "200 OK", "application/json", _json({"saved": f"{label}/{path.name}", "frame_seq": seen.frame.seq})

    def _collect_defect(self, environ) -> tuple[str, str, bytes]:
        """A recent defect saved with its published regions as the mask (defect/NAME.png + masks/NAME.png): the
        operator accepts the region, and `inspectd train` learns the map from it (mask supervision)."""
        request = self._collect_request(environ, '{"id": DEFECT_ID, "mask": PNG (optional)}', _MAX_MASK_BODY)
        record = self._record({"id": str(request.get("id", ""))})
        painted = None if request.get("mask") is None else _painted_mask(request["mask"])
        assert self.collect_dir is not None  # _collect_request checked
        try:
            image_path, mask_path = collect_defect(self.collect_dir, record, painted)
        except ValueError as exc:
            raise HttpError("400 Bad Request" if painted is not None else "409 Conflict", str(exc)) from None
        except OSError as exc:
            raise self._save_failed(exc) from None
        self.collected += 1
        how = "a painted mask" if painted is not None else "its regions as the mask"
        log.info("live view: saved defect %s with %s: %s, %s", record.id, how, image_path, mask_path)
        saved = {"saved": f"defect/{image_path.name}", "mask": f"masks/{mask_path.name}"}
        return "200 OK", "application/json", _json(saved)


def _painted_mask(value) -> np.ndarray:
    """A painted mask from a request: a base64 PNG (or a data URL of one) -> a grey image, or HttpError 400. The
    page sends its canvas: painted pixels are red, erased ones transparent black, so grey > 0 is the defect."""
    if not isinstance(value, str):
        raise HttpError("400 Bad Request", "mask: a base64 PNG expected")
    text = value
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if header != "data:image/png;base64":
            raise HttpError("400 Bad Request", "mask: a PNG expected (data:image/png;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise HttpError("400 Bad Request", "mask: not base64") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 24:
        raise HttpError("400 Bad Request", "mask: not a PNG image")
    # The size its header declares, before decoding: a small PNG can declare a picture of gigabytes.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > _MAX_MASK_PIXELS:
        raise HttpError("400 Bad Request", f"mask: {width}x{height} is larger than any frame the daemon keeps")
    image = _decode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise HttpError("400 Bad Request", "mask: not a PNG image")
    return image


class _Stream:
    """A streaming response whose close() (which the WSGI server calls however the response ends, even before
    its first part) frees the stream's place exactly once; a generator's own `finally` would never run if
    the server gave up before starting it."""

    def __init__(self, parts: Generator[bytes, None, None], release: Callable[[], None]):
        self._parts, self._release = parts, release
        self._released = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._parts)

    def close(self) -> None:
        try:
            self._parts.close()
        finally:
            if not self._released:
                self._released = True
                self._release()


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text))) if text else default
    except ValueError:
        return default


_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::\d{1,5})?")


def _loopback_host(host_header: str, configured: str = "") -> bool:
    """The Host header names this machine's loopback (localhost, 127.x.y.z, [::1]) or the configured bind
    host, with any port; anything else (another name, a malformed header) is not."""
    found = _HOST_HEADER.fullmatch(host_header.strip().lower())
    if found is None:
        return False
    host = found["v6"] or found["name"]
    if host in _LOOPBACK_NAMES or (configured and host == configured.strip("[]")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
