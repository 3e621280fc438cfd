"""The publisher's hand-over to the archive, and `inspectd archive export` back into a dataset that
`train` reads (real post-processed inspections, real files; no model needed)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from conftest import run_cli
from prometheus_client import CollectorRegistry
from support import make_inspection, wait_until

from inspectd.config import PublishConfig
from inspectd.metrics import Metrics
from inspectd.outputs.archive import Archive, RetentionIndex, entries, message_entry, read_entry, write_entry
from inspectd.outputs.export import ExportOptions, export_archive, parse_since
from inspectd.outputs.publish import Publisher
from inspectd.outputs.wire import encode_message, inspection_body, unsent_header
from inspectd.toolkit.dataset import scan

MODEL = {"name": "m", "sha256": "0" * 64}
T0 = 1795708800.0  # 2026-11-26T16:00:00Z


def _archive_inspection(root: Path, camera: str, seq: int, defect: bool, at: float, fmt: str = "jpeg") -> None:
    insp = make_inspection(camera, seq, defect=defect, archive_frame=fmt, ok_every=1, captured_at=at)
    body, parts = inspection_body(insp, MODEL, with_frame=True)
    keep = ((f"frame.{'jpg' if fmt == 'jpeg' else 'png'}", insp.archive_frame),)
    if defect:
        wire = encode_message(f"defect.{camera}", "run1", seq, body, parts)
        entry = message_entry(wire[1], wire[2:], keep)
    else:
        entry = message_entry(unsent_header(f"result.{camera}", "run1", body), parts, keep)
    write_entry(root, entry)


@pytest.fixture()
def archive(tmp_path) -> Path:
    root = tmp_path / "archive"
    for i in range(6):
        _archive_inspection(root, "line1-top", i + 1, defect=i % 2 == 0, at=T0 + 60 * i)
    _archive_inspection(root, "line2", 1, defect=True, at=T0 + 30, fmt="png")
    _archive_inspection(root, "line2", 2, defect=False, at=T0 + 90, fmt="png")
    return root


def test_export_writes_the_layout_train_reads_with_predictions_apart(archive, tmp_path):
    out = tmp_path / "dataset"
    summary = export_archive(ExportOptions(archive, out), progress=lambda *_: None)
    assert (summary.defect, summary.ok, summary.already, summary.unusable, summary.matched) == (4, 4, 0, 0, 8)
    ds = scan(out)
    assert ds.counts() == {"ok": 4, "defect": 4}
    assert not ds.has_masks and not (out / "masks").exists()  # the model's masks are never ground truth
    assert {p.suffix for p in (out / "defect").iterdir()} == {".jpg", ".png"}  # copied as archived, not re-encoded
    predictions = sorted(p.name for p in (out / "predictions").iterdir())
    assert len(predictions) == 2 * 4 + 4  # mask + regions per defect; mask only (results on) per ok frame
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all((out / rec["image"]).is_file() for rec in lines)
    by_image = {rec["image"]: rec for rec in lines}
    for rec in by_image.values():
        header, files = read_entry(Path(rec["archive_entry"]))
        assert rec["score"] == header["score"] and rec["camera"] == header["camera"]
        frame = files.get("frame.png") or files["frame.jpg"]
        assert (out / rec["image"]).read_bytes() == frame
        assert rec["image"].startswith("defect/" if header["is_defect"] else "ok/")


def test_export_again_adds_only_what_is_new(archive, tmp_path):
    out = tmp_path / "dataset"
    export_archive(ExportOptions(archive, out), progress=lambda *_: None)
    reviewed = next((out / "defect").iterdir())  # the operator moves a false alarm to ok/
    reviewed.rename(out / "ok" / reviewed.name)
    _archive_inspection(archive, "line1-top", 99, defect=True, at=T0 + 3600)
    again = export_archive(ExportOptions(archive, out), progress=lambda *_: None)
    assert (again.defect, again.ok, again.already) == (1, 0, 8)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 9
    assert not (out / "defect" / reviewed.name).exists()  # the review stands


def test_export_filters_by_camera_and_time(archive, tmp_path):
    one = export_archive(ExportOptions(archive, tmp_path / "a", cameras=("line2",)), progress=lambda *_: None)
    assert (one.defect, one.ok) == (1, 1)
    late = export_archive(ExportOptions(archive, tmp_path / "b", since=T0 + 120, until=T0 + 240), progress=lambda *_: None)
    assert late.matched == 2  # line1-top at +120 and +180; +240 is excluded
    assert parse_since("2026-11-26T16:00:00Z") == T0 and parse_since("2026-11-26") == T0 - 16 * 3600
    assert parse_since("2h", now=T0) == T0 - 7200 and parse_since("7d", now=T0) == T0 - 7 * 86400


def test_an_unusable_entry_is_skipped_and_counted(archive, tmp_path):
    broken = next(entries(archive))
    (broken / "header.json").write_bytes(b"{not json")
    summary = export_archive(ExportOptions(archive, tmp_path / "d"), progress=lambda *_: None)
    assert summary.unusable == 1 and summary.defect + summary.ok == 7


def test_export_command_exit_codes(archive, tmp_path):
    ok = run_cli("archive", "export", archive, "--out", tmp_path / "cli", "--camera", "line2")
    assert ok.returncode == 0 and "exported 1 defect and 1 ok frames" in ok.stdout, ok.stderr
    missing = run_cli("archive", "export", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert missing.returncode == 66 and missing.stderr.strip() == (
        f"inspectd archive export: error: {tmp_path / 'nowhere'}: no such archive folder"
    )
    bad = run_cli("archive", "export", archive, "--out", tmp_path / "x", "--since", "yesterday")
    assert bad.returncode == 2 and "not a time" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ publisher -> archive
def test_the_publisher_archives_what_it_sends_numbered_and_what_it_drops_unnumbered(tmp_path):
    archive = Archive(tmp_path / "a").start()
    pub = Publisher(
        PublishConfig(endpoint="tcp://127.0.0.1:0", send_hwm=1, heartbeat_s=60),
        Metrics(CollectorRegistry()),
        uuid.uuid4().hex,
        MODEL,
        outcome=archive.on_outcome,
    )
    first, second = (make_inspection("cam", seq, archive_frame="png") for seq in (1, 2))
    pub.publish_inspection(first, MODEL)  # queued (the publisher thread is not started yet)
    pub.publish_inspection(second, MODEL)  # the hand-off queue holds 1: dropped, still archived
    pub.start()
    ok = make_inspection("cam", 8, defect=False, archive_frame="png", ok_every=4)  # a sampled ok frame
    pub.publish_inspection(ok, MODEL)
    pub.publish_inspection(make_inspection("cam", 9, defect=False, archive_frame="png", ok_every=4), MODEL)
    wait_until(lambda: archive.written == 3, 10, lambda: f"3 entries written, got {archive.written}")
    pub.stop(1.0)
    archive.stop()
    kept = {h["frame_seq"]: (h, f) for h, f in (read_entry(e) for e in entries(tmp_path / "a"))}
    assert sorted(kept) == [1, 2, 8]  # frame 9 is not a multiple of ok_every: not kept
    assert kept[1][0]["seq"] == 1 and kept[1][0]["published_at"]  # sent: numbered as on the wire
    assert kept[2][0]["seq"] is None and kept[2][0]["published_at"] is None  # dropped by the publisher
    assert kept[8][0]["topic"] == "result.cam" and kept[8][0]["seq"] is None and not kept[8][0]["is_defect"]
    assert all("frame.png" in f and f["mask.png"] for _, f in kept.values())


def test_retention_runs_without_new_entries(tmp_path):
    root = tmp_path / "a"
    _archive_inspection(root, "cam", 1, defect=True, at=time.time() - 100)
    assert len(RetentionIndex.scan(root)) == 1
    archive = Archive(root, max_age_s=50, retention_every_s=0.05).start()
    try:
        wait_until(lambda: not list(entries(root)), 10, "the 100 s old entry removed (max_age_s 50)")
        assert archive.index.total_bytes == 0
    finally:
        archive.stop()
