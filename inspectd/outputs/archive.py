"""The defect archive, first step (issue 9): entries written atomically on a writer thread.

Not wired into the daemon yet (`[archive]` is still rejected by the config): this module is the
on-disk format and the writer, tested on their own.

Layout: `ROOT/<camera>/<YYYY-MM-DD>/<UTC time>_<frame seq>/` holds one entry's files (the header
JSON, the mask PNG, the frame). An entry is written into a temporary folder `.tmp-<name>` next to
its final place, every file fsynced, the folder fsynced, renamed to its final name, and the day
folder fsynced: a folder without the `.tmp-` prefix is always complete, whatever kills the
process when. Temporaries left by a crash are removed at start (`clean_temporaries`).

`<camera>` is `safe_component(camera id)`: one path component that can never leave ROOT.
"""

from __future__ import annotations

__all__ = ["ArchiveEntry", "Archive", "safe_component", "entry_dir", "write_entry", "clean_temporaries",
           "entries", "enforce_retention", "TEMP_PREFIX"]

import errno
import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

TEMP_PREFIX = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, eq=False)
class ArchiveEntry:
    """One defect event to keep: where it goes and its files ((file name, bytes), e.g. header.json)."""

    camera: str
    captured_at: float  # Unix time
    frame_seq: int
    files: tuple[tuple[str, bytes], ...]


def safe_component(camera: str) -> str:
    """A camera id as one file-name component: [A-Za-z0-9_-] kept, anything else `_`, at most 64
    characters; when that changed the id, a short hash of the original is appended so that two ids
    never share a folder (`a/b` and `a_b`). Never empty, never `.` or `..`, never hidden."""
    clean = _UNSAFE.sub("_", camera)[:64]
    if clean != camera or not clean:
        clean = f"{clean}~{hashlib.sha256(camera.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return clean


def entry_dir(root: Path, entry: ArchiveEntry) -> Path:
    when = datetime.fromtimestamp(entry.captured_at, tz=timezone.utc)
    name = f"{when:%Y%m%dT%H%M%S.%fZ}_{int(entry.frame_seq)}"
    return Path(root) / safe_component(entry.camera) / f"{when:%Y-%m-%d}" / name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_entry(root: Path, entry: ArchiveEntry) -> int:
    """Write one entry atomically (see the module doc); returns its bytes. Raises OSError."""
    final = entry_dir(root, entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f"{TEMP_PREFIX}{final.name}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    size = 0
    try:
        for name, data in entry.files:
            if "/" in name or name.startswith("."):
                raise ValueError(f"archive file name {name!r}: one plain component expected")
            with open(temp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            size += len(data)
        _fsync_dir(temp)
        if final.exists():  # the same camera frame twice (a second run in the same microsecond): keep the first
            shutil.rmtree(temp)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return size


def entries(root: Path) -> Iterator[Path]:
    """Every complete entry folder under root (ROOT/camera/day/entry), in no particular order."""
    for camera in Path(root).iterdir() if Path(root).is_dir() else ():
        if camera.is_dir() and not camera.name.startswith("."):
            for day in camera.iterdir():
                if day.is_dir():
                    yield from (e for e in day.iterdir() if e.is_dir() and not e.name.startswith(TEMP_PREFIX))


def clean_temporaries(root: Path) -> int:
    """Remove the temporaries a crash left; returns how many."""
    removed = 0
    for day in (d for c in Path(root).glob("*") if c.is_dir() for d in c.iterdir() if d.is_dir()):
        for temp in day.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(temp, ignore_errors=True)
            removed += 1
    return removed


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir())


def enforce_retention(root: Path, max_bytes: int, max_age_s: float, now: float | None = None) -> int:
    """Remove entries older than max_age_s, then the oldest until the archive holds at most max_bytes
    (0: no limit); empty day folders go too. Returns the number of entries removed."""
    now = time.time() if now is None else now
    found = []
    for e in entries(root):
        when = datetime.strptime(e.name.split("_", 1)[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
        found.append((when.timestamp(), e, _size(e)))
    found.sort(key=lambda t: t[0])
    total, removed = sum(s for _, _, s in found), 0
    for ts, e, size in found:
        if not ((max_age_s and now - ts > max_age_s) or (max_bytes and total > max_bytes)):
            break  # oldest first: every later entry is younger, and the total is within the limit
        shutil.rmtree(e, ignore_errors=True)
        total, removed = total - size, removed + 1
        try:
            e.parent.rmdir()  # the day folder, once empty
        except OSError:
            pass
    return removed


# OSError errno -> the drop reason counted in inspectd_archive_dropped_total{reason}
_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
            errno.EACCES: "permission", errno.EPERM: "permission"}


class Archive:
    """A writer thread behind a bounded queue: `submit` never blocks; what cannot be written is counted.

    `on_drop(reason)` is called for each entry lost: `queue_full` (the disk is slower than the defects),
    `disk_full`, `read_only`, `permission` or `error`; `dropped` keeps the counts.
    """

    def __init__(self, root: Path, queue_size: int = 256, max_bytes: int = 0, max_age_s: float = 0.0,
                 retention_every_s: float = 10.0, on_drop: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.max_bytes, self.max_age_s, self.retention_every_s = max_bytes, max_age_s, retention_every_s
        self.on_drop = on_drop or (lambda reason: None)
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self._queue: queue.Queue[ArchiveEntry | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)

    def start(self) -> Archive:
        self.root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.root)
        self._thread.start()
        return self

    def submit(self, entry: ArchiveEntry) -> bool:
        try:
            self._queue.put_nowait(entry)
            return True
        except queue.Full:
            self._drop("queue_full")
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.on_drop(reason)

    def _run(self) -> None:
        next_retention = time.monotonic()
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                write_entry(self.root, item)
                self.written += 1
            except OSError as exc:
                self._drop(_REASONS.get(exc.errno, "error"))
            except Exception:  # a bad entry must not end the writer: counted, and the next one is written
                self._drop("error")
            if (self.max_bytes or self.max_age_s) and time.monotonic() >= next_retention:
                try:
                    enforce_retention(self.root, self.max_bytes, self.max_age_s)
                except OSError:
                    pass  # retried at the next interval; a full or read-only disk shows in the drops
                next_retention = time.monotonic() + self.retention_every_s
