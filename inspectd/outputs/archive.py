"""The defect archive (docs/archive.md): entries written atomically on a writer thread.

    archive = Archive(Path("/var/lib/inspectd/archive"), max_bytes=10**10).start()
    archive.submit(message_entry(header_json, attachments, extra))   # never blocks; losses counted
    archive.stop()

The publisher hands it every defect event as sent (`inspectd.outputs.publish`).

Layout: `ROOT/<camera>/<YYYY-MM-DD>/<UTC time>_<frame seq>/` holds one entry's files (the header
JSON, the mask PNG, the frame). An entry is written into a temporary folder `.tmp-<name>` next to
its final place, every file fsynced, the folder fsynced, renamed to its final name, and the day
folder fsynced: a folder without the `.tmp-` prefix is always complete, whatever kills the
process when. Temporaries left by a crash are removed at start (`clean_temporaries`).

`<camera>` is `safe_component(camera id)`: one path component that can never leave ROOT.
"""

from __future__ import annotations

__all__ = [
    "ArchiveEntry",
    "Archive",
    "RetentionIndex",
    "safe_component",
    "entry_dir",
    "entry_time",
    "write_entry",
    "clean_temporaries",
    "entries",
    "enforce_retention",
    "TEMP_PREFIX",
    "DROP_REASONS",
    "HEADER_FILE",
    "file_name",
    "message_entry",
    "read_entry",
    "entry_message",
]

import bisect
import errno
import hashlib
import heapq
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from inspectd.losses import LossLog
from inspectd.outputs.fanout import Outcome
from inspectd.outputs.wire import parse_rfc3339

log = logging.getLogger("inspectd.outputs.archive")

TEMP_PREFIX = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, eq=False)
class ArchiveEntry:
    """One defect event to keep: where it goes and its files ((file name, bytes), e.g. header.json)."""

    camera: str
    captured_at: float  # Unix time
    frame_seq: int
    files: tuple[tuple[str, bytes], ...]
    published: tuple[str, str, int] | None = None  # (run_id, topic, seq) when it was published: replayable
    topic: str = ""  # the message's topic (defect.<camera>, result.<camera> for a sampled ok frame)


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


def _make_dirs(folder: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates (a new camera or day folder must survive
    a power cut as well as the entries in it)."""
    if folder.is_dir():
        return
    _make_dirs(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    _fsync_dir(folder.parent)


def write_entry(root: Path, entry: ArchiveEntry) -> int:
    """Write one entry atomically (see the module doc); returns its bytes. Raises OSError."""
    final = entry_dir(root, entry)
    _make_dirs(final.parent)
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
            size = 0
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


def entry_time(entry: Path) -> float:
    """An entry folder's capture time (Unix), from its name."""
    stamp = entry.name.split("_", 1)[0]
    return datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _published_key(header: dict) -> tuple[str, str, int] | None:
    """(run_id, topic, seq) of an entry that was published; None for one that was not (seq null)."""
    run, topic, seq = header.get("run_id"), header.get("topic"), header.get("seq")
    if isinstance(run, str) and isinstance(topic, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return run, topic, seq
    return None


class RetentionIndex:
    """The archive's entries in memory, so that neither retention nor replay rescans the disk: built
    once by a scan at start, then told of every entry written.

    By capture time (a heap: the oldest entry is always the next to go) with the total size, and,
    for entries that were published, by (run_id, topic) -> {seq: folder} for replay. Thread-safe:
    the writer thread adds and expires, the replay thread looks up."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, int, tuple[str, str, int] | None]] = []
        # (run_id, topic) -> (its seqs, sorted; seq -> folder): replay takes a bounded slice by bisection
        self._published: dict[tuple[str, str], tuple[list[int], dict[int, str]]] = {}
        # The defect events (topic defect.*), by capture time, all and per camera folder: the live view lists the
        # newest without looking at the sampled ok frames around them.
        self._defects: list[tuple[float, str]] = []
        self._defects_by: dict[str, list[tuple[float, str]]] = {}
        self._defect_paths: set[str] = set()
        self._lock = threading.Lock()
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._heap)

    @classmethod
    def scan(cls, root: Path) -> RetentionIndex:
        index = cls()
        for e in entries(root):
            try:
                header = json.loads((e / HEADER_FILE).read_bytes())
                key = _published_key(header) if isinstance(header, dict) else None
                topic = str(header.get("topic", "")) if isinstance(header, dict) else ""
                index.add(entry_time(e), e, _size(e), key, topic)
            except (OSError, ValueError):  # removed meanwhile, or a foreign folder: not ours to expire
                continue
        return index

    def add(self, when: float, path: Path, size: int, published: tuple[str, str, int] | None = None, topic: str = "") -> None:
        with self._lock:
            heapq.heappush(self._heap, (when, str(path), size, published))
            self.total_bytes += size
            if topic.startswith("defect.") and str(path) not in self._defect_paths:
                key = (when, str(path))
                self._defect_paths.add(str(path))
                bisect.insort(self._defects, key)  # appended at the end, as entries are written in time order
                bisect.insort(self._defects_by.setdefault(Path(path).parent.parent.name, []), key)
            if published is not None:
                run, topic, seq = published
                seqs, paths = self._published.setdefault((run, topic), ([], {}))
                if seq not in paths:
                    bisect.insort(seqs, seq)  # appended at the end, as seqs are written in order
                paths[seq] = str(path)

    def published(self, run_id: str, topic: str, after_seq: int, limit: int) -> list[tuple[int, Path]]:
        """At most `limit` archived entries of (run_id, topic) with seq > after_seq, in seq order."""
        with self._lock:
            seqs, paths = self._published.get((run_id, topic), ([], {}))
            start = bisect.bisect_right(seqs, after_seq)
            found = [(seq, paths[seq]) for seq in seqs[start : start + limit]]
        return [(seq, Path(path)) for seq, path in found]

    def newest_defects(self, limit: int, folder: str | None = None) -> list[tuple[float, Path]]:
        """The `limit` newest defect entries (capture time, entry folder), newest first; of one camera folder
        (`safe_component(camera)`) only, or of all."""
        with self._lock:
            found = (self._defects if folder is None else self._defects_by.get(folder, []))[-limit:]
        return [(when, Path(path)) for when, path in reversed(found)]

    def knows(self, run_id: str, topic: str) -> bool:
        with self._lock:
            return bool(self._published.get((run_id, topic)))

    def expire(self, max_bytes: int, max_age_s: float, now: float | None = None) -> int:
        """Remove entries older than max_age_s, then the oldest until at most max_bytes remain (0: no
        limit); empty day folders go too. Returns the number of entries removed."""
        now = time.time() if now is None else now
        removed = 0
        while True:
            with self._lock:
                if not self._heap:
                    break
                when, path, size, published = self._heap[0]
                if not ((max_age_s and now - when > max_age_s) or (max_bytes and self.total_bytes > max_bytes)):
                    break  # oldest first: every later entry is younger, and the total is within the limit
                heapq.heappop(self._heap)
                self.total_bytes -= size
                if path in self._defect_paths:
                    self._defect_paths.discard(path)
                    for found in (self._defects, self._defects_by.get(Path(path).parent.parent.name, [])):
                        i = bisect.bisect_left(found, (when, path))
                        if i < len(found) and found[i] == (when, path):
                            del found[i]
                if published is not None:  # gone for replay before it is gone from the disk
                    seqs, paths = self._published.get(published[:2], ([], {}))
                    if paths.pop(published[2], None) is not None:
                        del seqs[bisect.bisect_left(seqs, published[2])]
                    if not paths:
                        self._published.pop(published[:2], None)
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
            try:
                Path(path).parent.rmdir()  # the day folder, once empty
            except OSError:
                pass
        return removed


def enforce_retention(root: Path, max_bytes: int, max_age_s: float, now: float | None = None) -> int:
    """One pass of retention over what is on disk (see `RetentionIndex.expire`)."""
    return RetentionIndex.scan(root).expire(max_bytes, max_age_s, now)


# OSError errno (None for some: then "error") -> the drop reason counted in inspectd_archive_dropped_total{reason}
_REASONS: dict[int | None, str] = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
}
DROP_REASONS = ("queue_full", "disk_full", "read_only", "permission", "error")


class Archive:
    """A writer thread behind a bounded queue: `submit` never blocks; what cannot be written is counted.

    `on_drop(reason)` is called for each entry lost: `queue_full` (the disk is slower than the defects),
    `disk_full`, `read_only`, `permission` or `error`; `dropped` keeps the counts. Retention runs on the
    same thread every `retention_every_s`, whether or not entries arrive.
    """

    def __init__(
        self,
        root: Path,
        queue_size: int = 256,
        max_bytes: int = 0,
        max_age_s: float = 0.0,
        retention_every_s: float = 10.0,
        on_drop: Callable[[str], None] | None = None,
        on_written: Callable[[], None] | None = None,
    ):
        self.root = Path(root)
        self.on_written = on_written or (lambda: None)
        self.max_bytes, self.max_age_s, self.retention_every_s = max_bytes, max_age_s, retention_every_s
        self.on_drop = on_drop or (lambda reason: None)
        self.losses = LossLog(log, f"archive {self.root}", "entries")  # every loss in the journal, rate-limited
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self.last_drop: tuple[float, str] | None = None  # (time.monotonic(), reason) of the latest loss
        self.index = RetentionIndex()
        self._pending: Counter[tuple[str, str, int]] = Counter()  # published entries queued, not yet written
        self._written = threading.Condition()
        self._queue: queue.Queue[ArchiveEntry | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)

    def start(self) -> Archive:
        """Create the folder, remove a crash's temporaries, index what is there (OSError if the folder
        cannot be made or read), start the writer."""
        self.root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.root)
        self.index = RetentionIndex.scan(self.root)
        self._thread.start()
        return self

    def on_outcome(self, outcome: Outcome) -> None:
        """The publisher's listener: every message that carries the archive's frame (defect events, sent
        byte for byte or dropped and unnumbered; ok frames sampled) becomes an entry."""
        if outcome.kept_frame is not None:
            encoding, data = outcome.kept_frame
            self.submit(message_entry(outcome.header, outcome.attachments, ((file_name("frame", encoding), data),)))

    def submit(self, entry: ArchiveEntry) -> bool:
        if entry.published is not None:
            with self._written:
                self._pending[entry.published] += 1
        try:
            self._queue.put_nowait(entry)
            return True
        except queue.Full:
            self._done(entry)
            self._drop("queue_full")
            return False

    def wait_written(self, run_id: str, topic: str, upto_seq: int, timeout: float) -> bool:
        """Wait until no published entry of (run_id, topic) up to `upto_seq` is still queued (replay asks this
        before it calls a seq gone); False on timeout."""

        def clear() -> bool:
            return not any(k[0] == run_id and k[1] == topic and k[2] <= upto_seq for k in self._pending)

        with self._written:
            return self._written.wait_for(clear, timeout)

    def _done(self, entry: ArchiveEntry) -> None:
        if entry.published is not None:
            with self._written:
                self._pending[entry.published] -= 1
                if self._pending[entry.published] <= 0:
                    del self._pending[entry.published]
                self._written.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then end the thread; what is left then is counted as lost."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        if self._thread.is_alive():
            lost = self._queue.qsize()
            for _ in range(lost):
                self._drop("error")
        self.losses.flush()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def losing(self, within_s: float = 60.0) -> str | None:
        """ "archive: N entries lost (reasons), the latest R s ago" while losses are recent, else None."""
        last = self.last_drop
        if last is None or time.monotonic() - last[0] > within_s:
            return None
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items()))
        return f"archive losing entries ({reasons} since start; latest {last[1]} {time.monotonic() - last[0]:.0f} s ago)"

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.last_drop = (time.monotonic(), reason)
        self.on_drop(reason)
        self.losses.lost(reason)

    def _run(self) -> None:
        next_retention = time.monotonic()
        while True:
            item: ArchiveEntry | Literal[False] | None
            try:
                item = self._queue.get(timeout=max(0.0, next_retention - time.monotonic()))
            except queue.Empty:
                item = False  # nothing to write: a retention tick
            if item is None:
                self.losses.flush()
                return
            if item is not False:
                self._write(item)
            self.losses.flush(due_only=True)  # losses that came after the last line, once it is old enough
            if time.monotonic() >= next_retention:
                self._retention()
                next_retention = time.monotonic() + self.retention_every_s

    def _write(self, item: ArchiveEntry) -> None:
        try:
            size = write_entry(self.root, item)
            if size:
                self.index.add(item.captured_at, entry_dir(self.root, item), size, item.published, item.topic)
                self.written += 1
                self.on_written()
        except OSError as exc:
            self._drop(_REASONS.get(exc.errno, "error"))
        except Exception:  # a bad entry must not end the writer: counted, and the next one is written
            self._drop("error")
        finally:
            self._done(item)

    def _retention(self) -> None:
        if self.max_bytes or self.max_age_s:
            try:
                self.index.expire(self.max_bytes, self.max_age_s)
            except OSError:
                pass  # retried at the next interval; a full or read-only disk shows in the drops


# -- entries from wire messages --------------------------------------------------------------------

HEADER_FILE = "header.json"


def file_name(kind: str, encoding: str) -> str:
    """An attachment's file name inside an entry: mask.png, frame.jpg, frame.png, regions.png."""
    return f"{kind}.{'jpg' if encoding == 'jpeg' else encoding}"


def message_entry(header_json: bytes, attachments: Sequence[bytes] = (), extra: Sequence[tuple[str, bytes]] = ()) -> ArchiveEntry:
    """An entry from a message as it was sent: the header JSON byte for byte (so a replay sends exactly
    what was published), each attachment as `file_name(kind, encoding)`, then archive-only files
    (`extra`: the frame in the archive's format when it is not attached, or in another format)."""
    header = json.loads(header_json)
    files = {HEADER_FILE: bytes(header_json)}
    for spec, data in zip(header.get("attachments", []), attachments):
        files[file_name(spec["kind"], spec["encoding"])] = bytes(data)
    for name, data in extra:
        files.setdefault(name, data)
    return ArchiveEntry(
        header["camera"],
        parse_rfc3339(header["captured_at"]),
        int(header["frame_seq"]),
        tuple(files.items()),
        _published_key(header),
        str(header.get("topic", "")),
    )


def entry_message(path: Path) -> list[bytes]:
    """A published entry as the multipart message that was sent: [topic, header JSON, *attachments]."""
    header, files = read_entry(path)
    names = [file_name(a["kind"], a["encoding"]) for a in header.get("attachments", [])]
    return [header["topic"].encode("ascii"), files[HEADER_FILE], *(files[n] for n in names)]


def read_entry(path: Path) -> tuple[dict, dict[str, bytes]]:
    """An entry folder -> (its header, {file name: bytes}); OSError or ValueError if it is not one."""
    files = {f.name: f.read_bytes() for f in Path(path).iterdir() if f.is_file()}
    if HEADER_FILE not in files:
        raise ValueError(f"{path}: no {HEADER_FILE}")
    header = json.loads(files[HEADER_FILE])
    if not isinstance(header, dict):
        raise ValueError(f"{path}: {HEADER_FILE} is not a JSON object")
    return header, files
