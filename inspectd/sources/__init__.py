"""Camera sources and the camera worker.

`open_source(cfg)` picks the Source for a camera from one explicit table keyed by the kind of
input (from the URL scheme, or `pipeline`) and the backend; `CameraWorker` runs one camera in its
own thread (reconnect with backoff, stall watchdog, states, metrics). See docs/cameras.md.

>>> worker = CameraWorker(cfg, sink=slot.put, metrics=metrics, on_state=publish_status)
>>> worker.start(); ...; worker.stop(); worker.join(2.0)
"""

from __future__ import annotations

__all__ = [
    "open_source",
    "source_kind",
    "CameraWorker",
    "Source",
    "SourceError",
    "EndOfStream",
    "DecodeError",
    "redact",
    "backoff_delay",
]

from inspectd.sources.base import DecodeError, EndOfStream, Source, SourceError, redact
from inspectd.sources.camera import CameraWorker, backoff_delay
from inspectd.sources.registry import open_source, source_kind
