"""The live view's recent defects: from the archive when it is on, else from a bounded ring in memory.

    recent = ArchiveDefects(archive) if archive else MemoryDefects(limit=50, max_bytes=64_000_000)
    publisher_fanout.listen("recent defects", recent.on_outcome)   # MemoryDefects only: each defect event
    recent.recent(camera="line1-top", limit=20)      # newest first: DefectRecord (header only)
    recent.get(record_id)                            # one, with its files: header, mask, frame, regions

Both keep the event's header as it was sent (or archived unsent, `seq` null), so what the page shows
is what consumers got. The memory ring keeps the frame as the pipeline had it (a reference, encoded
only when someone opens it) and forgets the oldest beyond `limit` entries or `max_bytes`.
"""

from __future__ import annotations

__all__ = ["DefectRecord", "MemoryDefects", "ArchiveDefects", "DefectLog"]

import json
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from inspectd.outputs.archive import HEADER_FILE, Archive, file_name, read_entry, safe_component
from inspectd.outputs.fanout import Fate, Outcome


@dataclass(frozen=True, eq=False)
class DefectRecord:
    """One defect event: its header, and (from `get`) its files by archive name (mask.png, frame.jpg...)."""

    id: str
    header: dict
    header_json: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    image: np.ndarray | None = None  # the frame itself (memory ring): RGB, encoded only when asked for
    size: int = 0

    @property
    def camera(self) -> str:
        return str(self.header.get("camera", ""))

    def summary(self) -> dict:
        """What the page lists: camera, time, score, regions, episode, seq."""
        h = self.header
        return {
            "id": self.id,
            "camera": self.camera,
            "captured_at": h.get("captured_at"),
            "score": h.get("score"),
            "frame_seq": h.get("frame_seq"),
            "seq": h.get("seq"),
            "episode": h.get("episode"),
            "regions": len(h.get("regions") or ()),
        }


class DefectLog(Protocol):
    def recent(self, camera: str | None = None, limit: int = 50) -> list[DefectRecord]: ...

    def get(self, record_id: str) -> DefectRecord | None: ...


class MemoryDefects:
    """The last defect events in memory: at most `limit` of them within `max_bytes` (the newest is always kept)."""

    def __init__(self, limit: int = 50, max_bytes: int = 64_000_000, prefix: str = "m"):
        """`prefix` starts every id (the daemon's run id: ids are never reused across restarts, so a browser's
        cached picture of one event is never shown for another)."""
        self.limit, self.max_bytes, self.prefix = limit, max_bytes, prefix
        self._items: deque[DefectRecord] = deque()
        self._bytes = 0
        self._count = 0
        self._lock = threading.Lock()

    def on_outcome(self, outcome: Outcome) -> None:
        """The publisher's listener: every defect event, as sent or, if dropped, unnumbered, with its frame."""
        if outcome.fate is not Fate.KEPT and outcome.topic.startswith("defect."):
            self.add(outcome.header, outcome.attachments, outcome.image)

    def add(self, header_json: bytes, attachments: Sequence[bytes] = (), image: np.ndarray | None = None) -> None:
        """A defect event as sent: its header JSON, its attachments in header order, the frame (by reference)."""
        header = json.loads(header_json)
        files = {
            file_name(spec["kind"], spec["encoding"]): bytes(data)
            for spec, data in zip(header.get("attachments", []), attachments)
        }
        size = len(header_json) + sum(len(d) for d in files.values()) + (image.nbytes if image is not None else 0)
        with self._lock:
            self._count += 1
            self._items.append(DefectRecord(f"{self.prefix}-{self._count}", header, bytes(header_json), files, image, size))
            self._bytes += size
            while len(self._items) > 1 and (len(self._items) > self.limit or self._bytes > self.max_bytes):
                self._bytes -= self._items.popleft().size

    def recent(self, camera: str | None = None, limit: int = 50) -> list[DefectRecord]:
        with self._lock:
            items = list(self._items)
        return [r for r in reversed(items) if camera is None or r.camera == camera][:limit]

    def get(self, record_id: str) -> DefectRecord | None:
        with self._lock:
            return next((r for r in self._items if r.id == record_id), None)


# An archive entry's id: its folder relative to the archive (camera/day/entry), nothing else.
_ENTRY_ID = re.compile(r"[A-Za-z0-9_~-]{1,80}/\d{4}-\d\d-\d\d/\d{8}T\d{6}\.\d{6}Z_\d{1,20}")
_HEADER_CACHE = 4096  # parsed headers kept (an entry's header never changes); a listing reads at most [ui] recent


class ArchiveDefects:
    """The archive's newest defect entries (topic defect.*), from its in-memory index (which keeps the defects
    apart from the sampled ok frames) and their header files."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self._headers: OrderedDict[str, tuple[dict, bytes] | None] = OrderedDict()
        self._lock = threading.Lock()

    def recent(self, camera: str | None = None, limit: int = 50) -> list[DefectRecord]:
        root = self.archive.root
        found = []
        for _, path in self.archive.index.newest_defects(limit, safe_component(camera) if camera is not None else None):
            record_id = path.relative_to(root).as_posix()
            loaded = self._header(record_id, path)
            if loaded is not None:  # None: expired meanwhile
                found.append(DefectRecord(record_id, *loaded))
        return found

    def get(self, record_id: str) -> DefectRecord | None:
        if not _ENTRY_ID.fullmatch(record_id):
            return None
        try:
            header, files = read_entry(self.archive.root / record_id)
        except (OSError, ValueError):  # expired meanwhile, or never was
            return None
        return DefectRecord(record_id, header, files.pop(HEADER_FILE), files)

    def _header(self, record_id: str, path: Path) -> tuple[dict, bytes] | None:
        with self._lock:
            if record_id in self._headers:
                self._headers.move_to_end(record_id)
                return self._headers[record_id]
        try:
            raw = (path / HEADER_FILE).read_bytes()
            header = json.loads(raw)
            loaded = (header, raw) if isinstance(header, dict) else None
        except (OSError, ValueError):
            loaded = None
        with self._lock:
            self._headers[record_id] = loaded
            while len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return loaded
