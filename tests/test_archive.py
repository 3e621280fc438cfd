"""The archive's on-disk format and writer (inspectd.outputs.archive), on real files.

Not yet wired into the daemon: the kill -9 and full-disk tests come with that step."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inspectd.outputs.archive import (
    TEMP_PREFIX,
    Archive,
    ArchiveEntry,
    clean_temporaries,
    enforce_retention,
    entries,
    entry_dir,
    safe_component,
    write_entry,
)


def _entry(camera="cam1", seq=1, at=None, payload=b"x" * 100) -> ArchiveEntry:
    header = json.dumps({"camera": camera, "frame_seq": seq}).encode()
    return ArchiveEntry(
        camera, time.time() if at is None else at, seq, (("header.json", header), ("mask.png", payload), ("frame.jpg", payload))
    )


@given(st.text(min_size=0, max_size=100))
def test_a_camera_id_never_leaves_the_archive(camera):
    root = Path("/srv/archive")
    part = safe_component(camera)
    assert part and "/" not in part and "\0" not in part and not part.startswith(".")
    path = entry_dir(root, _entry(camera, at=1.8e9))
    assert os.path.normpath(path).startswith("/srv/archive/") and path.parent.parent.name == part


def test_sanitized_ids_do_not_collide():
    assert safe_component("line1-top") == "line1-top"  # plain ids stay readable
    names = {safe_component(c) for c in ("a/b", "a_b", "a:b", "../a_b", "", ".", "..")}
    assert len(names) == 7


def test_an_entry_is_written_whole_and_read_back(tmp_path):
    entry = _entry(at=1795725600.25)
    size = write_entry(tmp_path, entry)
    [found] = list(entries(tmp_path))
    assert found == entry_dir(tmp_path, entry)
    assert found.relative_to(tmp_path).parts[:2] == ("cam1", "2026-11-26")
    assert {f.name: f.read_bytes() for f in found.iterdir()} == dict(entry.files)
    assert size == sum(len(d) for _, d in entry.files)
    assert not list(found.parent.glob(f"{TEMP_PREFIX}*"))


def test_a_crash_leaves_only_temporaries_which_are_cleaned_at_start(tmp_path):
    write_entry(tmp_path, _entry(seq=1))
    day = next(entries(tmp_path)).parent
    torn = day / f"{TEMP_PREFIX}20261126T000000.000000Z_2"  # what a kill -9 mid-entry leaves
    torn.mkdir()
    (torn / "header.json").write_bytes(b'{"cam')
    assert len(list(entries(tmp_path))) == 1  # a temporary is never an entry
    assert clean_temporaries(tmp_path) == 1 and not torn.exists()
    assert len(list(entries(tmp_path))) == 1


def test_retention_by_age_then_bytes_oldest_first(tmp_path):
    now = 1795725600.0
    for i, age in enumerate((7200, 3000, 2000, 1000, 10)):
        write_entry(tmp_path, _entry(seq=i, at=now - age, payload=b"x" * 1000))
    assert enforce_retention(tmp_path, 0, 3600, now) == 1  # the 2-hour-old entry
    left = sorted(e.name for e in entries(tmp_path))
    assert len(left) == 4 and all(not n.endswith("_0") for n in left)
    per_entry = sum(f.stat().st_size for f in next(entries(tmp_path)).iterdir())
    assert enforce_retention(tmp_path, 2 * per_entry, 0, now) == 2  # the two oldest of the four
    assert sorted(e.name.rsplit("_", 1)[1] for e in entries(tmp_path)) == ["3", "4"]


def test_the_writer_never_blocks_and_counts_what_it_drops(tmp_path):
    drops = []
    archive = Archive(tmp_path / "a", queue_size=2, on_drop=drops.append)
    assert [archive.submit(_entry(seq=i)) for i in range(4)] == [True, True, False, False]  # not started: queue full
    assert drops == ["queue_full", "queue_full"] and archive.dropped["queue_full"] == 2
    archive.start()
    archive.stop()
    assert archive.written == 2 and len(list(entries(tmp_path / "a"))) == 2


def test_a_write_error_is_counted_and_the_writer_goes_on(tmp_path):
    root = tmp_path / "a"
    archive = Archive(root, on_drop=lambda reason: None).start()
    (root / "cam1").write_text("a file where the camera folder should be")  # NotADirectoryError on write
    archive.submit(_entry("cam1"))
    archive.submit(_entry("cam2"))
    archive.stop()
    assert archive.dropped == {"error": 1} and archive.written == 1
    assert [e.parent.parent.name for e in entries(root)] == ["cam2"]


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "a/b"])
def test_file_names_inside_an_entry_are_plain(tmp_path, bad):
    with pytest.raises(ValueError, match="one plain component"):
        write_entry(tmp_path, ArchiveEntry("cam1", time.time(), 1, ((bad, b"x"),)))
    assert not list(entries(tmp_path)) and not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))


_WRITER = r"""
import hashlib, json, os, sys, time
from inspectd.outputs.archive import Archive, ArchiveEntry
archive = Archive(sys.argv[1], queue_size=64).start()
seq = 0
while True:  # until SIGKILL: entries of 0.2-2 MB, as fast as the disk takes them
    seq += 1
    frame = os.urandom(200_000 * (1 + seq % 10))
    mask = os.urandom(5_000)
    header = {"frame_seq": seq, "sha256": {"frame.jpg": hashlib.sha256(frame).hexdigest(),
                                           "mask.png": hashlib.sha256(mask).hexdigest()}}
    entry = ArchiveEntry("cam/../1", time.time(), seq,
                         (("frame.jpg", frame), ("mask.png", mask), ("header.json", json.dumps(header).encode())))
    while not archive.submit(entry):
        time.sleep(0.001)
"""


@pytest.mark.slow
def test_kill_9_during_heavy_writing_leaves_no_torn_entry(tmp_path):
    """A real process writing entries as fast as it can, killed with SIGKILL: every entry present is
    whole (its header parses and lists the digests of the files beside it), temporaries are all that a
    crash leaves, and the next start removes them."""
    import signal
    import subprocess
    import sys

    from support import wait_until

    root = tmp_path / "archive"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)])
    try:
        wait_until(lambda: len(list(entries(root))) >= 30 if root.exists() else False, 120, "30 entries written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    found = list(entries(root))
    assert len(found) >= 30 and {e.parent.parent.name for e in found} == {safe_component("cam/../1")}
    for entry in found:
        header = json.loads((entry / "header.json").read_bytes())
        files = {f.name for f in entry.iterdir()}
        assert files == {"header.json", "frame.jpg", "mask.png"}, (entry, files)
        for name, digest in header["sha256"].items():
            assert hashlib.sha256((entry / name).read_bytes()).hexdigest() == digest, (entry, name)
    clean_temporaries(root)
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))
    assert len(list(entries(root))) == len(found)
