"""`inspectd watch`: subscribe to daemons, print one line per event, optionally save masks and overlays.

Built on `inspectd.client`. By default it subscribes to `defect.`, `status.` and `heartbeat`;
heartbeats then only confirm the connection (one "connected" line per run, and they keep
`--timeout` from firing while the daemon is alive) and are printed only when asked for with
`--topic heartbeat`. Sequence gaps and publisher restarts are reported as lines starting with
`!` (on stdout, or on stderr with `--json` so that stdout stays one JSON header per line).
Malformed messages (see `inspectd.client`) never stop it: each is skipped with one line on stderr,
and their number is printed on stderr at exit.

With `--replay` (the daemon's `[replay] endpoint`) gaps are filled before the event after them is
printed, and with `--state FILE` a restarted watch resumes where it stopped: the positions are
written (atomically) after each printed event, and SIGTERM (exit 0) never stops it between a
line and its state, so a watch stopped and started again prints every event exactly once. A kill -9 between
the print and the write can print one event twice.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TOPICS", "add_parser", "run", "add_curve_arguments", "curve_keys"]

import argparse
import json
import os
import re
import signal
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

from inspectd.client import Event, EventKind, Subscriber
from inspectd.drawing import logit_of, logits_of_u8
from inspectd.errors import DataError, UsageError
from inspectd.imageio import write_png
from inspectd.outputs.wire import DEFAULT_ENDPOINT, parse_rfc3339
from inspectd.pipeline.postprocess import overlay, upsample
from inspectd.security import ClientKeys

DEFAULT_TOPICS = ("defect.", "episode.", "status.", "heartbeat")


def add_parser(subparsers) -> None:
    """Register `watch` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "watch",
        help="subscribe to a daemon's events and print them; save masks and overlays",
        description="Print one line per event (defects and camera status by default). Heartbeats are "
        "subscribed to confirm the connection but printed only with --topic heartbeat. Lost events (seq "
        "gaps) and daemon restarts are reported on lines starting with '!'.",
    )
    p.add_argument(
        "endpoints",
        nargs="*",
        metavar="ENDPOINT",
        default=[DEFAULT_ENDPOINT],
        help=f"daemon publish endpoint(s) (default {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--topic",
        action="append",
        metavar="T",
        help="topic prefix, repeatable: defect. | defect.CAMERA | result. | status. | heartbeat | '' "
        f"for everything (default: {' '.join(DEFAULT_TOPICS)})",
    )
    p.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="write CAMERA_FRAMESEQ_mask.png and _regions.png, and with an attached frame _frame.jpg and _overlay.png",
    )
    p.add_argument(
        "--map",
        default="relative",
        choices=("relative", "probability"),
        help="the saved overlays' map: relative to the event's mask threshold, or the calibrated probability",
    )
    p.add_argument("--json", action="store_true", help="print each event's header as one JSON line")
    p.add_argument("--count", type=int, metavar="N", help="exit 0 after N printed events")
    p.add_argument("--timeout", type=float, metavar="S", help="exit 1 if nothing (not even a heartbeat) arrives for S seconds")
    p.add_argument(
        "--replay",
        action="append",
        metavar="ENDPOINT",
        help="the daemon's replay endpoint ([replay] endpoint), one per ENDPOINT in the same order: "
        "lost events are fetched and printed in order, marked [replayed]",
    )
    p.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="resume from FILE and keep it current (JSON positions): with --replay, a restarted watch "
        "prints every event exactly once",
    )
    add_curve_arguments(p, "ENDPOINT")
    p.set_defaults(func=run)


def add_curve_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--client-key / --server-key: for daemons (or a proxy) that use CURVE (docs/security.md)."""
    p.add_argument(
        "--client-key",
        type=Path,
        metavar="FILE",
        help="our CURVE secret key file (NAME.key_secret from inspectd keys generate, mode 0600); its "
        "public key must be in the daemon's publish.curve_clients folder",
    )
    p.add_argument(
        "--server-key",
        type=Path,
        action="append",
        metavar="FILE",
        help=f"the daemon's CURVE public key file (server.key): one for every {what}, or one per {what} in the same order",
    )


def curve_keys(args: argparse.Namespace, endpoints: list[str]) -> list | None:
    """The ClientKeys per endpoint from --client-key/--server-key (None: plain text); UsageError if half given."""

    if args.client_key is None and args.server_key is None:
        return None
    if args.client_key is None or args.server_key is None:
        raise UsageError("--client-key and --server-key go together (CURVE needs our key pair and the daemon's public key)")
    servers = args.server_key * len(endpoints) if len(args.server_key) == 1 else args.server_key
    if len(servers) != len(endpoints):
        raise UsageError(
            f"{len(args.server_key)} --server-key file(s) for {len(endpoints)} endpoint(s): give one, "
            "or one per endpoint in the same order"
        )
    return [ClientKeys.load(args.client_key, server) for server in servers]


def run(args: argparse.Namespace) -> int:
    """Print events until Ctrl-C (exit 0), --count events (exit 0) or --timeout silence (exit 1)."""
    _check_args(args)
    topics = list(DEFAULT_TOPICS) if args.topic is None else args.topic
    show_heartbeats = args.topic is not None and any("heartbeat".startswith(t) for t in topics)
    skipped = _Skipped()
    positions = _load_state(args.state) if args.state else None
    keys = curve_keys(args, args.endpoints)
    try:
        with Subscriber(
            args.endpoints,
            topics,
            decode=args.save is not None,
            on_malformed=skipped.notice,
            replay=args.replay,
            positions=positions,
            curve=keys,
        ) as sub:
            return _print_events(sub, args, show_heartbeats, skipped)
    except KeyboardInterrupt:
        return 0
    finally:
        skipped.summary()


def _check_args(args: argparse.Namespace) -> None:
    """UsageError for a bad --count, --timeout or --save."""
    if args.replay is not None and len(args.replay) != len(args.endpoints):
        raise UsageError(
            f"{len(args.replay)} --replay endpoint(s) for {len(args.endpoints)} ENDPOINT(s): "
            "give one per ENDPOINT, in the same order"
        )
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count {args.count}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be more than 0 seconds")
    if args.save is not None:
        try:
            args.save.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--save {args.save}: cannot create the folder: {exc.strerror}") from None


class _Skipped:
    """Malformed messages: one line on stderr each as they come, and the count at exit."""

    def __init__(self) -> None:
        self.count = 0

    def notice(self, endpoint: str, reason: str) -> None:
        self.count += 1
        print(f"inspectd watch: skipped a malformed message from {endpoint}: {reason}", file=sys.stderr, flush=True)

    def summary(self) -> None:
        if self.count:
            print(f"inspectd watch: {self.count} malformed message(s) skipped", file=sys.stderr, flush=True)


def _load_state(path: Path) -> dict[str, dict[str, int]] | None:
    """--state FILE: {run_id: {topic: seq}}; None when it does not exist yet (a first start)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"--state {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    ok = isinstance(state, dict) and all(
        isinstance(r, str) and isinstance(t, dict) and all(isinstance(k, str) and type(v) is int for k, v in t.items())
        for r, t in state.items()
    )
    if not ok:
        raise DataError(f"--state {path}: not an inspectd watch state ({{run_id: {{topic: seq}}}})")
    return state


def _save_state(path: Path, positions: dict) -> None:
    """Atomically: a crash leaves the old state or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as f:
        json.dump(positions, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _print_events(sub: Subscriber, args: argparse.Namespace, show_heartbeats: bool, skipped: _Skipped) -> int:
    """The receive loop of `run`."""
    notices = sys.stderr if args.json else sys.stdout
    runs: dict[str, set[str]] = {}  # endpoint -> the runs seen there
    # SIGTERM ends the watch (exit 0) between two events, never between a line and the state that
    # records it: the handler raises only outside that section (blocking the signal would not do: it
    # can be delivered to any thread of the process).
    term = _Termination()
    previous = signal.signal(signal.SIGTERM, term.handler)
    try:
        return _loop(sub, args, show_heartbeats, skipped, notices, runs, term)
    except _Stopped:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM, at a point where stopping loses nothing."""


class _Termination:
    def __init__(self) -> None:
        self.critical = False  # printing a line and writing its state
        self.pending = False

    def handler(self, *_) -> None:
        if self.critical:
            self.pending = True
        else:
            raise _Stopped

    def leave_critical(self) -> None:
        self.critical = False
        if self.pending:
            raise _Stopped


def _loop(
    sub: Subscriber, args: argparse.Namespace, show_heartbeats: bool, skipped: _Skipped, notices, runs: dict, term: _Termination
) -> int:
    shown = 0
    while args.count is None or shown < args.count:
        event = sub.recv(timeout_s=args.timeout)
        if event is None:
            print(f"inspectd watch: no event for {args.timeout:g} s from {', '.join(args.endpoints)}", file=sys.stderr)
            return 1
        try:
            _notices(event, runs, notices)
            if event.kind is EventKind.HEARTBEAT and not show_heartbeats:
                continue
            line = json.dumps(event.header, ensure_ascii=False) if args.json else describe(event)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            # The client checked the header; anything it let through that we cannot show is still no crash.
            skipped.notice(event.endpoint, f"{event.topic}: cannot show it: {type(exc).__name__}: {exc}")
            continue
        term.critical = True
        try:
            print(line + ("  [replayed]" if event.replayed and not args.json else ""), flush=True)
            if args.save is not None:
                _save(event, args.save, args.map)
            if args.state is not None:
                _save_state(args.state, sub.positions)
            shown += 1
        finally:
            term.leave_critical()
    return 0


def _local_time(stamp: str) -> str:
    return datetime.fromtimestamp(parse_rfc3339(stamp)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _notices(event: Event, runs: dict[str, set[str]], out) -> None:
    """'connected' on the first message from a run, '!' lines for restarts and lost messages. An endpoint
    can carry several runs at once (daemons behind `inspectd proxy`)."""
    h = event.header
    when = _local_time(h["published_at"])
    seen = runs.setdefault(event.endpoint, set())
    if event.restarted:  # said once per run, on the message that showed it (maybe not the run's first)
        print(f"{when}  ! daemon restarted, now run {h['run_id']} at {event.endpoint}", file=out, flush=True)
    elif h["run_id"] not in seen:
        print(f"{when}  connected to run {h['run_id']} at {event.endpoint}", file=out, flush=True)
    if h["run_id"] not in seen:
        if len(seen) > 256:  # bounded: a watch left running for years sees many restarts
            seen.clear()
        seen.add(h["run_id"])
    if event.gap:
        print(f"{when}  ! {event.gap} message(s) lost on {event.topic} before seq {h['seq']}", file=out, flush=True)


def describe(event: Event) -> str:
    """One human-readable line: time, topic, then what matters for the kind of event."""
    h = event.header
    if event.kind in (EventKind.DEFECT, EventKind.RESULT):
        verdict = "DEFECT" if h["is_defect"] else "ok"
        line = (
            f"{_local_time(h['captured_at'])}  {event.topic}  camera {h['camera']}  frame {h['frame_seq']}  "
            f"{verdict} score {h['score']:.3f} (threshold {h['threshold']:.2f})  regions {len(h['regions'])}"
        )
        if h["regions"]:
            x, y, w, hh = max(h["regions"], key=lambda r: r["area_px"])["bbox"]
            line += f"  largest {w}x{hh} at {x},{y}"
        return line
    if event.kind is EventKind.EPISODE:
        best = h["best"]
        x, y, w, hh = best.get("bbox") or (0, 0, 0, 0)
        where = f"  largest {w}x{hh} at {x},{y}" if best.get("bbox") else ""
        return (
            f"{_local_time(h['ended_at'])}  {event.topic}  camera {h['camera']}  episode {h['episode']} ended "
            f"({h['end_reason']}): {h['frames']} frames ({h['defect_frames']} defective) over {h['duration_s']:.2f} s, "
            f"peak {h['peak_score']:.3f} at frame {best['frame_seq']}{where}"
        )
    if event.kind is EventKind.PART:
        why = f" ({h['reason']})" if h["reason"] else ""
        score = "" if h.get("score") is None else f"  score {h['score']:.3f}"
        return (
            f"{_local_time(h['decided_at'])}  {event.topic}  camera {h['camera']}  part {h['part_id']}  "
            f"{h['verdict'].upper()}{why} -> {h['action']}{score}  {h['latency_ms']:.0f} ms after capture"
        )
    if event.kind is EventKind.STATUS:
        detail = f"  ({h['detail']})" if h.get("detail") else ""
        return f"{_local_time(h['published_at'])}  {event.topic}  camera {h['camera']}  {h['state']}{detail}"
    cameras = " ".join(f"{c}={s}" for c, s in (h.get("cameras") or {}).items()) or "none"
    fps = "?" if h.get("fps") is None else f"{h['fps']:.1f}"
    return f"{_local_time(h['published_at'])}  {event.topic}  fps {fps}  cameras {cameras}  uptime {h['uptime_s']:.0f} s"


def _save(event: Event, folder: Path, map_mode: str = "relative") -> None:
    """The masks as sent; with a frame, the frame as sent and an overlay of the mask and regions on it."""
    if "mask" not in event.raw:
        return
    h = event.header
    # An episode summary carries its best frame's masks: CAMERA_episodeN_mask.png, _regions.png.
    which = f"episode{int(h['episode'])}" if event.kind is EventKind.EPISODE else str(int(h["frame_seq"]))
    stem = folder / f"{re.sub(r'[^A-Za-z0-9_-]', '_', h['camera'])}_{which}"
    try:
        Path(f"{stem}_mask.png").write_bytes(event.raw["mask"])
        if "regions" in event.raw:
            Path(f"{stem}_regions.png").write_bytes(event.raw["regions"])
        if event.frame is not None and event.mask is not None:
            Path(f"{stem}_frame.jpg").write_bytes(event.raw["frame"])
            prob = event.mask.astype(np.float32) / 255.0
            height, width = event.frame.shape[:2]
            if prob.shape != (height, width):  # a CAM-resolution mask
                prob = upsample(prob, width, height)
            if not h.get("regions"):
                mask = None
            elif event.regions_mask is not None and event.regions_mask.shape == (height, width):
                mask = event.regions_mask > 0  # exact
            else:  # a daemon from before the regions attachment
                mask = prob >= float(h.get("mask_threshold", 0.5))
            cut = logit_of(float(h.get("mask_threshold", 0.5)))
            regions = tuple(h.get("regions") or ())
            logits = logits_of_u8(event.mask)
            if logits.shape != (height, width):  # upsampled as logits, as the daemon upsamples
                logits = upsample(logits, width, height)
            picture = overlay(event.frame, logits, h["score"], h["threshold"], cut, mask, regions, map_mode)
            write_png(Path(f"{stem}_overlay.png"), picture)
    except OSError as exc:  # keep watching: a full disk must not hide the events themselves
        print(f"inspectd watch: cannot save {stem}_*: {exc.strerror}", file=sys.stderr, flush=True)
