"""`inspectd archive export`: the archive -> a dataset folder that `train` and `evaluate` read.

    summary = export_archive(ExportOptions(archive=Path("/var/lib/inspectd/archive"), out=Path("review")))

Frames of defect entries go to `OUT/defect/`, sampled ok frames to `OUT/ok/`, copied byte for byte
(no re-encoding). The folder is the **model's verdict**, not ground truth: an operator reviews it
(moves false alarms to `ok/`) before training. The model's own masks go to `OUT/predictions/`,
never to `OUT/masks/`, which `train` and `evaluate` read as ground truth. `OUT/manifest.jsonl` has
one line per exported frame (camera, capture time, score, model, run and seq, the archive entry).
Exporting again into the same folder adds only what is new: an entry named in the manifest is
skipped wherever its frame is now (an operator's review moves frames between folders).
"""

from __future__ import annotations

__all__ = ["ExportOptions", "ExportSummary", "export_archive", "parse_since"]

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from inspectd.errors import NoInputError, UsageError
from inspectd.outputs.archive import entries, entry_time, read_entry, safe_component

PREDICTIONS = "predictions"  # never `masks/`: train and evaluate read that as ground truth
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class ExportOptions:
    archive: Path
    out: Path
    cameras: tuple[str, ...] = ()  # camera ids; empty = all
    since: float | None = None  # Unix time; entries captured at or after it
    until: float | None = None  # Unix time; entries captured before it


@dataclass(frozen=True)
class ExportSummary:
    defect: int  # frames written to defect/
    ok: int  # frames written to ok/
    already: int  # entries exported before (same file name): skipped
    unusable: int  # entries without a readable header or frame: skipped
    matched: int  # entries in the camera and time range


def parse_since(text: str, now: float | None = None) -> float:
    """`2026-11-26`, `2026-11-26T13:40:00Z` (RFC 3339; no zone = UTC) or an age: `90m`, `24h`, `7d` -> Unix time."""
    now = time.time() if now is None else now
    m = _DURATION.fullmatch(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r}: not a time; use 2026-11-26, 2026-11-26T13:40:00Z or an age such as 24h, 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _selected(opts: ExportOptions) -> list[tuple[float, Path]]:
    """The entries in the camera and time range, oldest first (time read from the folder name)."""
    folders = {safe_component(c) for c in opts.cameras}
    found = []
    for entry in entries(opts.archive):
        if folders and entry.parent.parent.name not in folders:
            continue
        try:
            when = entry_time(entry)
        except ValueError:  # not an entry name: a foreign folder
            continue
        if (opts.since is None or when >= opts.since) and (opts.until is None or when < opts.until):
            found.append((when, entry))
    return sorted(found)


def _frame(files: dict[str, bytes]) -> tuple[str, bytes] | None:
    for name in ("frame.png", "frame.jpg"):  # the lossless one first, when both are kept
        if name in files:
            return name.rsplit(".", 1)[1], files[name]
    return None


def _manifest_line(header: dict, image: Path, entry: Path, out: Path) -> str:
    keep = ("camera", "captured_at", "frame_seq", "score", "threshold", "is_defect", "model", "run_id", "topic", "seq", "regions")
    record = {"image": image.relative_to(out).as_posix(), **{k: header.get(k) for k in keep}, "archive_entry": str(entry)}
    return json.dumps(record, separators=(",", ":")) + "\n"


def _report(done: int, total: int) -> None:
    if done == total or done % 1000 == 0:
        print(f"inspectd archive export: {done}/{total} entries", file=sys.stderr, flush=True)


def export_archive(opts: ExportOptions, progress: Callable[[int, int], None] = _report) -> ExportSummary:
    if not Path(opts.archive).is_dir():
        raise NoInputError(f"{opts.archive}: no such archive folder")
    if opts.since is not None and opts.until is not None and opts.until <= opts.since:
        raise UsageError("--until must be later than --since")
    selected = _selected(opts)
    out = Path(opts.out)
    for sub in ("defect", "ok", PREDICTIONS):
        (out / sub).mkdir(parents=True, exist_ok=True)
    counts = {"defect": 0, "ok": 0, "already": 0, "unusable": 0}
    done = _exported(out / "manifest.jsonl")
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as manifest:
        for i, (_, entry) in enumerate(selected, 1):
            counts["already" if str(entry) in done else _export_one(entry, out, manifest)] += 1
            progress(i, len(selected))
    return ExportSummary(counts["defect"], counts["ok"], counts["already"], counts["unusable"], len(selected))


def _exported(manifest: Path) -> set[str]:
    """The archive entries a manifest already names (a torn last line, from a crash, is ignored)."""
    done = set()
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                done.add(str(json.loads(line)["archive_entry"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _export_one(entry: Path, out: Path, manifest) -> str:
    """Copy one entry's frame (and predictions); returns which count it adds to."""
    try:
        header, files = read_entry(entry)
    except (OSError, ValueError):
        return "unusable"
    frame = _frame(files)
    if frame is None or not isinstance(header.get("is_defect"), bool):
        return "unusable"
    label = "defect" if header["is_defect"] else "ok"
    stem = f"{entry.parent.parent.name}_{entry.name}"  # camera folder + time_seq: unique in the archive
    image = out / label / f"{stem}.{frame[0]}"
    if image.exists():
        return "already"
    for kind in ("mask", "regions"):
        if f"{kind}.png" in files:
            (out / PREDICTIONS / f"{stem}_{kind}.png").write_bytes(files[f"{kind}.png"])
    temp = image.with_name(f".{image.name}.tmp")  # a frame file is complete or absent, as in the archive
    temp.write_bytes(frame[1])
    temp.replace(image)
    manifest.write(_manifest_line(header, image, entry, out))
    return label
