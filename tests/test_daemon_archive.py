"""The archive in the running daemon (a real `inspectd run` subprocess): every defect event kept as
published, sampled ok frames, and a full disk (a real tmpfs in a private mount namespace) that costs
the archive its entries but never the events or the inspection."""

from __future__ import annotations

import json
import re
import shlex

import cv2
import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config, free_port
from support import collect_events, http_get, scrape, unshare_unavailable, wait_until

from inspectd.client import Subscriber
from inspectd.outputs.archive import TEMP_PREFIX, entries, file_name, read_entry

pytestmark = pytest.mark.slow

CAMERA = "synthetic://?fps=10&width=320&height=240&defect_rate=0.5&seed=4"


def _archive(root) -> list[tuple[dict, dict[str, bytes]]]:
    return [read_entry(e) for e in entries(root)]


def _check_entry(header: dict, files: dict[str, bytes]) -> None:
    """An entry is whole: its header parses and every attachment it names is there and decodes."""
    for spec in header["attachments"]:
        data = files[file_name(spec["kind"], spec["encoding"])]
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape[:2] == (spec["height"], spec["width"]), (header, spec)


def test_every_defect_event_is_archived_as_published_with_sampled_ok_frames(tmp_path):
    root = tmp_path / "archive"
    ui = free_port()
    config, urls = daemon_config(
        tmp_path,
        camera_toml("cam-1", CAMERA),
        archive={"dir": str(root), "frame_format": "png", "ok_every": 4},
        ui={"enabled": True, "port": ui},
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], topics=["defect."]) as sub:
            received = collect_events(sub, 5, "defect", timeout=60, message=daemon.log)
        wait_until(
            lambda: (scrape(urls["metrics"]).value("inspectd_archive_written_total") or 0) >= 10, 60, "10 archive entries written"
        )
        m = scrape(urls["metrics"])
        assert m.value("inspectd_archive_dropped_total", reason="disk_full") == 0  # every reason exported from 0
        assert m.value("inspectd_archive_bytes") > 0 and m.value("inspectd_archive_entries") > 0
        # The live view lists recent defects from the archive (ids are entry folders), never its ok samples.
        wait_until(
            lambda: json.loads(http_get(f"http://127.0.0.1:{ui}/api/defects?limit=5")[1])["defects"],
            30,
            "defects listed by the live view",
        )
        status, body = http_get(f"http://127.0.0.1:{ui}/api/defects?limit=5")
        listed = json.loads(body)["defects"]
        assert status == 200 and listed and all(d["id"].startswith("cam-1/") for d in listed), listed
        status, body = http_get(f"http://127.0.0.1:{ui}/api/defect?id={listed[0]['id']}")
        assert status == 200 and json.loads(body)["topic"] == "defect.cam-1"
        assert daemon.terminate() == 0, daemon.log()
    kept = _archive(root)
    assert not list(root.rglob(f"{TEMP_PREFIX}*"))
    defects = {h["seq"]: (h, f) for h, f in kept if h["topic"] == "defect.cam-1"}
    oks = [(h, f) for h, f in kept if h["topic"] == "result.cam-1"]
    # Every defect event the daemon published is there, numbered as sent: 1..n without a gap.
    assert sorted(defects) == list(range(1, len(defects) + 1)), sorted(defects)
    for ev in received:  # ...byte for byte what a consumer received
        header, files = defects[ev.header["seq"]]
        assert header == ev.header and ev.header["run_id"] == header["run_id"]
        assert files["mask.png"] == ev.raw["mask"] and files["regions.png"] == ev.raw["regions"]
    for header, files in defects.values():
        _check_entry(header, files)
        frame = cv2.imdecode(np.frombuffer(files["frame.png"], np.uint8), cv2.IMREAD_COLOR)
        assert frame.shape == (240, 320, 3)  # the lossless frame, though frames are not attached to events
        assert "frame.png" not in [file_name(a["kind"], a["encoding"]) for a in header["attachments"]]
    assert oks, "no ok frame sampled"
    for header, files in oks:
        assert header["seq"] is None and not header["is_defect"] and header["frame_seq"] % 4 == 0
        assert set(files) == {"header.json", "frame.png"}


def test_a_full_disk_costs_archive_entries_not_events(tmp_path):
    """A 256 KiB tmpfs fills within seconds: the archive counts disk_full drops, /healthz says so and
    stays 200 (a full disk must not make systemd restart inspection), events keep flowing, and what
    the archive holds is whole."""
    why = unshare_unavailable()
    if why:
        pytest.skip(why)
    root, copy = tmp_path / "archive", tmp_path / "copy"
    root.mkdir()
    copy.mkdir()
    # The tmpfs exists only in the daemon's mount namespace: copy what it held out once the daemon exits.
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(root))} || exit 97; "
        "\"$@\" & pid=$!; trap 'kill -TERM $pid' TERM INT; wait $pid; wait $pid; rc=$?; "
        f"cp -a {shlex.quote(str(root))}/. {shlex.quote(str(copy))}/; exit $rc"
    )
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh")
    config, urls = daemon_config(
        tmp_path,
        camera_toml("cam-1", CAMERA.replace("defect_rate=0.5", "defect_rate=1")),
        archive={"dir": str(root), "frame_format": "png"},
    )
    with DaemonProcess(config, tmp_path / "daemon.log", prefix=prefix) as daemon:
        daemon.wait_ready(urls["metrics"])

        def disk_full() -> float:
            return scrape(urls["metrics"]).value("inspectd_archive_dropped_total", reason="disk_full") or 0

        wait_until(lambda: disk_full() > 0, 60, lambda: f"a disk_full drop:\n{daemon.log()}")
        status, detail = http_get(urls["metrics"] + "/healthz")
        assert status == 200 and "archive losing entries" in detail and "disk_full" in detail, detail
        # Said in the journal too, not only in a metric: the first loss at once, then a line every 10 s at most.
        wait_until(
            lambda: re.search(r"WARNING .*archive .*: lost \d+ entries.*\(disk_full \d+", daemon.log()),
            10,
            lambda: f"the loss logged:\n{daemon.log()}",
        )
        m = scrape(urls["metrics"])
        assert m.value("inspectd_archive_errors_total") >= disk_full()
        with Subscriber(urls["events"], topics=["defect."]) as sub:  # events still flow, after the disk filled
            collect_events(sub, 3, "defect", timeout=60, message=daemon.log)
        assert daemon.terminate() == 0, daemon.log()
    kept = _archive(copy)
    assert kept, "nothing was archived before the disk filled"
    assert not list(copy.rglob(f"{TEMP_PREFIX}*"))  # a failed write leaves no temporary behind
    for header, files in kept:
        _check_entry(header, files)
        assert json.loads(files["header.json"]) == header and "frame.png" in files


def test_sigterm_while_frames_are_in_flight_publishes_and_archives_every_inferred_frame(tmp_path):
    """A camera faster than the model, every frame kept (defects as events, ok frames with ok_every 1):
    after SIGTERM the archive holds exactly the frames the shutdown log says were inferred, and the
    defect events among them were all published (numbered 1..n without a gap)."""
    root = tmp_path / "archive"
    camera = "synthetic://?fps=40&width=320&height=240&defect_rate=0.5&seed=9"
    config, urls = daemon_config(tmp_path, camera_toml("cam-1", camera), archive={"dir": str(root), "ok_every": 1})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        wait_until(
            lambda: (scrape(urls["metrics"]).value("inspectd_archive_written_total") or 0) >= 10, 60, "10 entries archived"
        )
        assert daemon.terminate() == 0, daemon.log()
    account = re.search(
        r"frames cam-1: captured \d+ = inferred (\d+) \+ dropped \d+ \([^)]*\) \+ in flight 0; "
        r"residual 0",
        daemon.log(),
    )
    assert account, daemon.log()
    kept = _archive(root)
    assert len(kept) == int(account.group(1)), (len(kept), account.group(0))
    defects = sorted(h["seq"] for h, _ in kept if h["topic"] == "defect.cam-1")
    assert defects == list(range(1, len(defects) + 1))
