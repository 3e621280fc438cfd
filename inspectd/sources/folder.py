"""`dir:///path/to/images?fps=5`: the images of a folder, in sorted name order, as a camera.

Paced at `fps` (default 5) so a folder behaves like a camera rather than a batch job. At the end
the folder is listed again (new files join the next round) and played from the start when the
camera has `loop = true`; otherwise `EndOfStream`. A file that cannot be decoded is skipped with a
`DecodeError` (the worker counts it as captured and `frames_dropped{reason="decode"}`) on every pass,
but reported once: a failure already seen for the same file (path, mtime, size) is raised with
`repeated=True` and is not decoded again, so the log gets one line per bad file, not one per pass.
A file that changes is tried again.
"""

from __future__ import annotations

__all__ = ["FolderSource", "folder_path"]

import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from inspectd.config import CameraConfig
from inspectd.errors import InspectdError
from inspectd.imageio import IMAGE_SUFFIXES, read_rgb
from inspectd.sources.base import SKIPPED, DecodeError, EndOfStream, Pacer, Skipped, SourceError, query_params

_DEFAULTS = {"fps": 5.0}


def folder_path(url: str) -> Path:
    """dir:///abs/path -> /abs/path; dir://rel/path -> rel/path; a plain path is returned as is."""
    parts = urlsplit(url)
    if parts.scheme != "dir":
        return Path(url)
    return Path(unquote(parts.netloc + parts.path))


class FolderSource:
    """Plays the images of a folder at a fixed rate."""

    def __init__(self, cfg: CameraConfig):
        url = cfg.url or ""
        self.path = folder_path(url)
        self.loop = cfg.loop
        self._pacer = Pacer(query_params(url, _DEFAULTS)["fps"] if url.startswith("dir:") else _DEFAULTS["fps"])
        self._files: list[Path] = []
        self._next = 0
        self._failed: dict[Path, tuple[int, int]] = {}  # unreadable file -> (mtime_ns, size) when it failed
        self.part_id: str | None = None  # the name of the file last read: a part's id in part mode

    def _list(self) -> list[Path]:
        try:
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot list folder: {exc.strerror or exc}") from None
        if not files:
            raise SourceError(f"{self.path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files

    @property
    def period_s(self) -> float:
        return self._pacer.period

    def open(self) -> None:
        self._relist()
        self._pacer.reset()

    def read(self, timeout_s: float, skip_before: float = float("-inf")) -> np.ndarray | Skipped | None:
        if self._next >= len(self._files):
            if not self.loop:
                raise EndOfStream(f"{self.path}: end of folder ({len(self._files)} images)")
            self._relist()
        if not self._pacer.wait(timeout_s):
            return None
        path = self._files[self._next]
        self._next += 1
        self.part_id = path.name
        return SKIPPED if time.monotonic() < skip_before else self._decode(path)  # skipped: not read from disk

    def _relist(self) -> None:
        """Start a new pass; forget failures of files that are gone."""
        self._files, self._next = self._list(), 0
        listed = set(self._files)
        self._failed = {p: sig for p, sig in self._failed.items() if p in listed}

    def _decode(self, path: Path) -> np.ndarray:
        """The image, or DecodeError (repeated=True, without decoding, if this version already failed)."""
        signature = _signature(path)
        if signature is not None and self._failed.get(path) == signature:
            raise DecodeError(f"{path}: still unreadable (reported before)", repeated=True)
        try:
            image = read_rgb(path)
        except InspectdError as exc:  # vanished or corrupt: drop this one, keep the camera up
            if signature is not None:
                self._failed[path] = signature
            raise DecodeError(str(exc)) from None
        self._failed.pop(path, None)
        return image

    def close(self) -> None:
        self._files, self._next = [], 0


def _signature(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, None if it cannot be stat'ed (then it is tried, and reported, each time)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
