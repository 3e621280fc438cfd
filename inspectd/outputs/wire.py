"""The wire format `inspectd.event/1` (docs/wire-format.md): pure encode/decode, no sockets; and the
protocol constants both ends share (replay's request tag and end topic, the handshake failures).

Shared by the daemon's outputs and the consumer library (`inspectd.client`, the bridges); imports
nothing of the daemon beyond `frames`, so a consumer never pulls in TensorFlow or the daemon.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA",
    "REPLAY_SCHEMA",
    "REQUEST_TAG",
    "END_TOPIC",
    "TRIGGER_SCHEMA",
    "TRIGGER_TAG",
    "HANDSHAKE_FAILED",
    "HANDSHAKE_REASONS",
    "zmq_reason",
    "request_body",
    "json_object",
    "DEFAULT_ENDPOINT",
    "HEARTBEAT_TOPIC",
    "WireFormatError",
    "rfc3339",
    "parse_rfc3339",
    "inspection_body",
    "status_body",
    "episode_body",
    "part_body",
    "encode_message",
    "unsent_header",
    "decode_message",
]

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import zmq

from inspectd.frames import CameraState, Inspection, PartResult, published_probability

SCHEMA = "inspectd.event/1"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
HEARTBEAT_TOPIC = "heartbeat"

# Replay (docs/wire-format.md#replay): a request is [REQUEST_TAG, JSON]; an answer ends with [END_TOPIC, JSON].
REPLAY_SCHEMA = "inspectd.replay/1"
REQUEST_TAG = b"inspectd.replay/1"
END_TOPIC = "replay.end"

# The trigger endpoint (docs/parts.md#the-trigger-endpoint): a request and its answer are each [TRIGGER_TAG, JSON].
TRIGGER_SCHEMA = "inspectd.trigger/1"
TRIGGER_TAG = b"inspectd.trigger/1"

# A failed security handshake, as ZeroMQ's socket monitor reports it -> its reason, on both ends.
HANDSHAKE_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}
HANDSHAKE_REASONS = tuple(HANDSHAKE_FAILED.values())


def request_body(body: Sequence[bytes], tag: bytes, max_bytes: int) -> bytes:
    """The JSON part of a request `[tag, JSON]` to a ROUTER endpoint (replay, trigger); ValueError naming what is
    wrong with its envelope. Requests are untrusted: the size is checked before anything is parsed."""
    if sum(len(p) for p in body) > max_bytes:
        raise ValueError(f"request larger than {max_bytes} bytes")
    if len(body) != 2 or body[0] != tag:
        raise ValueError(f"a request is 2 parts: {tag.decode()!r} and a JSON object")
    return bytes(body[1])


def json_object(data: bytes) -> dict:
    """A request's JSON object; ValueError if it is not UTF-8 JSON or not an object."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the request is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("the request is not a JSON object")
    return obj


def zmq_reason(exc: zmq.ZMQError) -> str:
    """ZeroMQ's text for the error number of `exc`."""
    # pyzmq types errno `int | None`, but sets it (from zmq_errno()) whenever the error is not given one.
    return zmq.strerror(exc.errno)  # type: ignore[arg-type]


class WireFormatError(ValueError):
    """A message that is not `inspectd.event/1` (wrong number of parts, bad JSON, unknown schema)."""


def rfc3339(ts: float) -> str:
    """Unix time -> RFC 3339 UTC with microseconds, e.g. '2026-11-26T13:40:00.123456Z'."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """The inverse of `rfc3339` (accepts any RFC 3339 offset): -> Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def model_header(model: dict) -> dict:
    """The `model` object of a header: {id, name, sha256, runtime, precision} (id: the model's [[models]] id; runtime
    and precision: what ran it; each absent in events from versions before it)."""
    out = {"name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))}
    if "id" in model:
        out = {"id": str(model["id"]), **out}
    for key in ("runtime", "precision"):
        if key in model:
            out[key] = str(model[key])
    return out


def inspection_body(insp: Inspection, model: dict, with_frame: bool) -> tuple[dict, list[bytes]]:
    """The inspection fields of a defect/result header and its attachments (mask PNG, frame JPEG, regions PNG).

    `regions` comes last: it was added within inspectd.event/1, and consumers written for "mask, then
    frame" keep working even if they index the parts by position.

    The envelope (schema, run_id, topic, seq, published_at) is added at send time by `encode_message`.
    """
    frame = insp.frame
    attachments: list[dict] = []
    parts: list[bytes] = []
    if insp.mask_png:
        w, h = insp.mask_size
        attachments.append({"kind": "mask", "encoding": "png", "width": int(w), "height": int(h)})
        parts.append(insp.mask_png)
    if with_frame and insp.frame_jpeg:
        attachments.append({"kind": "frame", "encoding": "jpeg", "width": frame.width, "height": frame.height})
        parts.append(insp.frame_jpeg)
    if insp.regions_png:
        attachments.append({"kind": "regions", "encoding": "png", "width": frame.width, "height": frame.height})
        parts.append(insp.regions_png)
    body = {
        "camera": frame.camera,
        "frame_seq": int(frame.seq),
        "captured_at": rfc3339(frame.captured_at),
        "score": published_probability(insp.score),
        "threshold": published_probability(insp.threshold),
        "mask_threshold": published_probability(insp.mask_threshold),
        "is_defect": bool(insp.is_defect),
        "model": model_header(model),
        "regions": [_region(r) for r in insp.regions],
        "frame": {"width": frame.width, "height": frame.height},
        "episode": insp.episode,
        "attachments": attachments,
    }
    if frame.part is not None:  # part mode: the part this frame is (its verdict goes out on part.<camera>)
        body["part_id"] = frame.part.part_id
    return body, parts


def episode_body(ep, model: dict) -> tuple[dict, list[bytes]]:
    """An `episode.<camera>` summary (an `inspectd.pipeline.episodes.Episode`) and its attachments: the
    best frame's mask and regions PNGs."""
    best = ep.best
    best_body, parts = inspection_body(best, model, with_frame=False)
    body = {
        "camera": ep.camera,
        "episode": int(ep.number),
        "started_at": rfc3339(ep.first.frame.captured_at),
        "ended_at": rfc3339(ep.last.frame.captured_at),
        "duration_s": round(float(ep.duration_s), 6),
        "first_frame_seq": int(ep.first.frame.seq),
        "last_frame_seq": int(ep.last.frame.seq),
        "frames": int(ep.frames),
        "defect_frames": int(ep.defect_frames),
        "peak_score": published_probability(best.score),
        "end_reason": ep.end_reason,
        "best": {
            "frame_seq": int(best.frame.seq),
            "captured_at": rfc3339(best.frame.captured_at),
            "score": published_probability(best.score),
            "regions": [_region(r) for r in best.regions],
            "bbox": _region(best.regions[0])["bbox"] if best.regions else None,
        },
        "model": model_header(model),
        "frame": {"width": best.frame.width, "height": best.frame.height},
        "attachments": best_body["attachments"],
    }
    return body, parts


def part_body(result: PartResult, model: dict) -> dict:
    """The fields of a `part.<camera>` header (docs/parts.md): one part's one verdict, no attachments."""
    return {
        "camera": result.camera,
        "part_id": result.part_id,
        "verdict": result.verdict.value,
        "action": result.action,
        "reason": result.reason,
        "score": None if result.score is None else published_probability(result.score),
        "threshold": None if result.threshold is None else published_probability(result.threshold),
        "frame_seq": int(result.frame_seq),
        "trigger_at": None if result.trigger_at is None else rfc3339(result.trigger_at),
        "captured_at": rfc3339(result.captured_at),
        "decided_at": rfc3339(result.decided_at),
        "latency_ms": round(result.latency_s * 1000.0, 3),
        "model": model_header(model),
    }


def _region(region) -> dict:
    x, y, w, h = (int(v) for v in region.bbox)
    return {
        "bbox": [x, y, w, h],
        "area_px": int(region.area_px),
        "peak": published_probability(region.peak),
        "mean": published_probability(region.mean),
    }


def status_body(camera: str, state: CameraState | str, detail: str = "") -> dict:
    """The fields of a `status.<camera>` header."""
    return {"camera": camera, "state": CameraState(state).value, "detail": detail}


def _json_default(value):
    """numpy scalars and enums in heartbeat stats are common; anything else is a bug worth seeing."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_message(
    topic: str, run_id: str, seq: int, body: dict, attachments: Sequence[bytes] = (), published_at: float | None = None
) -> list[bytes]:
    """-> the multipart message [topic, header JSON, *attachments] with the envelope fields first."""
    stamp = rfc3339(time.time() if published_at is None else published_at)
    return [topic.encode("ascii"), _header_json(topic, run_id, int(seq), stamp, body), *attachments]


def unsent_header(topic: str, run_id: str, body: dict) -> bytes:
    """The header of a message that was never published (an ok frame sampled for the archive, or an event
    the publisher dropped): the wire header with `seq` and `published_at` null."""
    return _header_json(topic, run_id, None, None, body)


def _header_json(topic: str, run_id: str, seq: int | None, published_at: str | None, body: dict) -> bytes:
    """The header as JSON bytes: the envelope fields first, then `body`."""
    header = {"schema": SCHEMA, "run_id": run_id, "topic": topic, "seq": seq, "published_at": published_at, **body}
    header.setdefault("attachments", [])  # in every header, so consumers can always zip it with parts 2..
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode("utf-8")


def decode_message(parts: list[bytes]) -> tuple[str, dict, list[bytes]]:
    """[topic, header JSON, *attachments] -> (topic, header, attachments); WireFormatError if malformed."""
    if len(parts) < 2:
        raise WireFormatError(f"expected at least 2 parts (topic, header), got {len(parts)}")
    try:
        topic = bytes(parts[0]).decode("ascii")
        header = json.loads(bytes(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"undecodable topic or header: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header is not a JSON object")
    if header.get("schema") != SCHEMA:
        raise WireFormatError(f"topic {topic!r}: schema {header.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("run_id", str), ("seq", int)):
        if not isinstance(header.get(key), kind):
            raise WireFormatError(f"topic {topic!r}: header field {key!r} missing or not {kind.__name__}")
    attachments = [bytes(p) for p in parts[2:]]
    declared = header.get("attachments", [])
    if not isinstance(declared, list) or len(declared) != len(attachments):
        raise WireFormatError(
            f"topic {topic!r}: header names {len(declared) if isinstance(declared, list) else '?'} "
            f"attachments, message has {len(attachments)}"
        )
    return topic, header, attachments
