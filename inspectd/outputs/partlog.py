"""The part log (docs/parts.md): one JSON line per part verdict, so "what happened to part X" has an answer.

    partlog = PartLog(archive_root, run_id, max_age_s=30 * 86400)
    partlog.record(result, model)     # before the verdict is published: whatever a consumer saw is here
    partlog.late(inspection, result)  # the model's verdict on a part that had gone not_inspected
    find_parts(archive_root, "A-1043")  # -> every line about that part, oldest first

Files: `ROOT/parts-<UTC day>.jsonl` beside the archive's camera folders (a file, never a camera's
folder). A line is appended and flushed before its verdict is handed to the publisher, on the thread
that decided it: a `kill -9` loses nothing that was published (the kernel holds what was written);
a power cut may lose the last lines. About 450 bytes per part; files older than the archive's
`max_age_s` are removed at the day's change. A write that fails is counted, told (rate-limited), and
never stops the verdict from going out.
"""

from __future__ import annotations

__all__ = ["PartLog", "find_parts", "describe_part", "PART_FILE_GLOB"]

import errno
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from inspectd.frames import Inspection, PartResult, published_probability
from inspectd.losses import LossLog
from inspectd.outputs.wire import part_body, rfc3339

log = logging.getLogger("inspectd.outputs.partlog")

PART_FILE_GLOB = "parts-*.jsonl"
_DAY_FILE = re.compile(r"parts-(\d{4}-\d{2}-\d{2})\.jsonl")
_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only", errno.EACCES: "permission"}


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


class PartLog:
    """Appends part verdicts to the day's file; safe to call from any thread."""

    def __init__(self, root: Path, run_id: str, max_age_s: float = 0.0, wall=time.time):
        self.root, self.run_id, self.max_age_s, self._wall = Path(root), run_id, max_age_s, wall
        self.losses = LossLog(log, f"part log {self.root}", "lines")
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._file_day = ""

    def record(self, result: PartResult, model: dict) -> None:
        """One part's verdict (the fields of its `part.<camera>` message, and the run)."""
        self._append({"event": "verdict", "run_id": self.run_id, **part_body(result, model)}, result.decided_at)

    def late(self, insp: Inspection, result: PartResult) -> None:
        """The model's verdict on a part that had already gone not_inspected (`late`): for the record only."""
        now = self._wall()
        line = {
            "event": "late_verdict",
            "run_id": self.run_id,
            "camera": result.camera,
            "part_id": result.part_id,
            "frame_seq": result.frame_seq,
            "score": published_probability(insp.score),
            "is_defect": bool(insp.is_defect),
            "at": rfc3339(now),
            "latency_ms": round((time.monotonic() - insp.frame.captured_mono) * 1000.0, 3),
        }
        self._append(line, now)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.losses.flush()

    def _append(self, line: dict, ts: float) -> None:
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            try:
                self._open(_day(ts)).write(text)
                self._file.flush()  # type: ignore[union-attr]  # _open set it
            except OSError as exc:
                self._close_quietly()
                self.losses.lost(_REASONS.get(exc.errno or 0, "error"))
                return
        self.losses.flush(due_only=True)

    def _open(self, day: str) -> IO[str]:
        if self._file is None or day != self._file_day:
            self._close_quietly()
            self.root.mkdir(parents=True, exist_ok=True)
            self._file = open(self.root / f"parts-{day}.jsonl", "a", encoding="utf-8")
            self._file_day = day
            self._prune()
        return self._file

    def _close_quietly(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _prune(self) -> None:
        """Day files older than max_age_s go (0: kept forever)."""
        if not self.max_age_s:
            return
        oldest = _day(self._wall() - self.max_age_s)
        for path in self.root.glob(PART_FILE_GLOB):
            match = _DAY_FILE.fullmatch(path.name)
            if match and match[1] < oldest:
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("part log: cannot remove %s: %s", path, exc.strerror or exc)


def find_parts(root: Path, part_id: str, camera: str | None = None) -> Iterator[dict]:
    """Every line about `part_id` (of `camera`, if given) in the part log under `root`, oldest first.
    Lines that are not JSON (a line cut by a power loss) are skipped."""
    needle = json.dumps(part_id, ensure_ascii=False)  # as it appears in a line, quotes included
    for path in sorted(Path(root).glob(PART_FILE_GLOB)):
        with open(path, encoding="utf-8", errors="replace") as lines:
            for text in lines:
                if needle not in text:  # cheap filter before parsing: a day holds millions of lines
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if line.get("part_id") == part_id and (camera is None or line.get("camera") == camera):
                    yield line


def describe_part(line: dict) -> str:
    """One line of the part log for people."""
    if line.get("event") == "late_verdict":
        return (
            f"{line.get('at')}  camera {line.get('camera')}  part {line.get('part_id')}  the model's verdict came late: "
            f"{'defect' if line.get('is_defect') else 'ok'}, score {line.get('score')}, "
            f"{line.get('latency_ms')} ms after capture (run {line.get('run_id')})"
        )
    why = f" ({line.get('reason')})" if line.get("reason") else ""
    score = "" if line.get("score") is None else f", score {line.get('score')} (threshold {line.get('threshold')})"
    trigger = f", triggered {line.get('trigger_at')}" if line.get("trigger_at") else ""
    return (
        f"{line.get('decided_at')}  camera {line.get('camera')}  part {line.get('part_id')}  "
        f"{str(line.get('verdict', '?')).upper()}{why} -> {line.get('action')}{score}; captured {line.get('captured_at')}"
        f"{trigger}, verdict {line.get('latency_ms')} ms after capture (frame {line.get('frame_seq')}, run {line.get('run_id')})"
    )
