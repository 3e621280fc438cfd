"""What every camera source is: the `Source` protocol, its errors, pacing and URL helpers.

A source is opened, read and closed by one thread only (its camera worker); it never needs to be
thread-safe. `read` returns the next frame as HxWx3 RGB uint8, or None when none arrived within
`timeout_s` so that the worker can check for stop requests and stalls between frames. A frame that
arrives before `skip_before` (monotonic seconds: the camera's `fps_limit` would drop it) comes back as
SKIPPED, without the work of making it a picture (rendering, reading an image file, OpenCV's
retrieve, GStreamer sample to array): the worker counts it captured and dropped (`fps_limit`).

A source whose frames have ids of their own has a `part_id` attribute, the id of the frame last
read (folder: the file name; GenICam: the camera's frame id and timestamp): in part mode it
becomes the part's id (else its capture number). A source that can trigger its camera has
`fire(trigger)`: the worker calls it for each part asked for through the trigger endpoint; a
fired trigger the camera never answers comes back from `abandon()` when the session ends.
"""

from __future__ import annotations

__all__ = [
    "SourceError",
    "EndOfStream",
    "DecodeError",
    "Source",
    "Skipped",
    "SKIPPED",
    "Trigger",
    "Pacer",
    "redact",
    "query_params",
    "frame_period",
]

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from inspectd.frames import DropReason


class SourceError(Exception):
    """Opening or reading failed; the worker logs it (one line, credentials redacted) and reconnects."""


class EndOfStream(SourceError):
    """A non-looping file or folder has no more frames; the worker reports DOWN and stops reading."""


class DecodeError(SourceError):
    """One frame could not be decoded (e.g. a corrupt image in a folder); the worker drops it and goes on.

    `repeated`: the same failure was reported before; the worker counts the drop but does not log it again.
    `reason`: the drop reason it is counted under (`decode`; a GenICam camera's lost images: `incomplete`,
    `camera`).
    """

    def __init__(self, message: str, repeated: bool = False, reason: DropReason = DropReason.DECODE):
        super().__init__(message)
        self.repeated = repeated
        self.reason = reason


@dataclass(frozen=True)
class Trigger:
    """A part asked for: when (wall clock and monotonic), and the id it was asked for with (None: the source's own
    id for its image). Fired by a source that can trigger its camera (`fire`), else the name of its next frame."""

    at: float
    mono: float
    part_id: str | None = None


class Skipped:
    """A frame arrived and was not made into a picture (see `Source.read`'s skip_before); one instance."""

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED = Skipped()


@runtime_checkable
class Source(Protocol):
    """A camera as the worker sees it; `inspectd.sources.open_source(cfg)` builds the right one."""

    def open(self) -> None:
        """Connect; raise SourceError on failure; never block much longer than cfg.open_timeout_s."""

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        """The next frame (HxWx3 RGB uint8); None when none arrived within timeout_s; SKIPPED (not converted)
        when it arrived before the monotonic time skip_before."""

    def close(self) -> None:
        """Release everything; safe to call twice and after a failed open; `open` may follow again."""


def frame_period(source: object) -> float:
    """Seconds between frames of a paced source (file, folder, synthetic), else 0.

    Paced sources expose `period_s`; the worker's stall timeout is never shorter than two periods,
    so a folder played at 0.1 fps is not declared stalled between its frames.
    """
    return float(getattr(source, "period_s", 0.0) or 0.0)


# user:password@ inside any scheme://authority. The password is matched greedily up to the last
# '@' before whitespace: over-redacting a path that contains '@' is harmless, leaking is not.
_Params = TypeVar("_Params", bound=Mapping[str, object])
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<secret>\S*)@")


def redact(url: str) -> str:
    """Hide passwords in a URL or in a message containing URLs: rtsp://user:pass@host -> rtsp://user:***@host."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}:***@", url)


def query_params(url: str, defaults: _Params) -> _Params:
    """`?a=1&b=x` -> {'a': 1, 'b': 'x'}, converted to the type of each default; unknown keys are errors.

    `defaults` maps each allowed key to its default value (whose type is the conversion); the result is a dict with
    the same keys and value types (a TypedDict of defaults gives that TypedDict).
    """
    raw = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise SourceError(f"{redact(url)}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(defaults)}")
    out = dict(defaults)
    for key, text in raw.items():
        kind: type = type(defaults[key])
        try:
            out[key] = _parse_bool(text) if kind is bool else kind(text)
        except ValueError:
            raise SourceError(f"{redact(url)}: parameter {key}={text!r} is not a valid {kind.__name__}") from None
    return cast(_Params, out)  # each value converted to its default's type


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


class Pacer:
    """Releases frames at a fixed rate on the monotonic clock, so files and folders behave like cameras.

    >>> pacer = Pacer(fps=5)
    >>> if pacer.wait(timeout_s=0.2): ...   # True: a frame is due now; False: not yet, ask again
    A late consumer gets the next frame at once but never a burst: the schedule does not catch up.
    """

    def __init__(self, fps: float, clock=time.monotonic, sleep=time.sleep):
        if not fps > 0:
            raise SourceError(f"fps must be > 0 (got {fps})")
        self.period = 1.0 / fps
        self._clock, self._sleep = clock, sleep
        self._due: float | None = None  # None: the first frame is due immediately

    def reset(self) -> None:
        self._due = None

    def wait(self, timeout_s: float) -> bool:
        """Sleep until the next frame is due (at most timeout_s); True if it is due, and book the next one."""
        now = self._clock()
        if self._due is not None and now < self._due:
            self._sleep(min(self._due - now, max(timeout_s, 0.0)))
            now = self._clock()
            if now < self._due:
                return False
        # Keep the grid while on time; when more than a period late, re-anchor rather than catch up.
        nxt = None if self._due is None else self._due + self.period
        self._due = nxt if nxt is not None and nxt > now else now + self.period
        return True
