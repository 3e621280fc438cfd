"""`dir:///path/to/images?fps=5`: the images of a folder, in sorted name order, as a camera.

Paced at `fps` (default 5) so a folder behaves like a camera rather than a batch job. At the end
the folder is listed again (new files join the next round) and played from the start when the
camera has `loop = true`; otherwise `EndOfStream`. A file that cannot be decoded is skipped with a
`DecodeError` (the worker counts it as `frames_dropped{reason="decode"}`).
"""

from __future__ import annotations

__all__ = ["FolderSource", "folder_path"]

from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from inspectd.errors import InspectdError
from inspectd.imageio import IMAGE_SUFFIXES, read_rgb
from inspectd.service.config import CameraConfig
from inspectd.sources.base import DecodeError, EndOfStream, Pacer, SourceError, query_params

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
        self._files, self._next = self._list(), 0
        self._pacer.reset()

    def read(self, timeout_s: float) -> np.ndarray | None:
        if self._next >= len(self._files):
            if not self.loop:
                raise EndOfStream(f"{self.path}: end of folder ({len(self._files)} images)")
            self._files, self._next = self._list(), 0
        if not self._pacer.wait(timeout_s):
            return None
        path = self._files[self._next]
        self._next += 1
        try:
            return read_rgb(path)
        except InspectdError as exc:  # vanished or corrupt: drop this one, keep the camera up
            raise DecodeError(str(exc)) from None

    def close(self) -> None:
        self._files, self._next = [], 0
