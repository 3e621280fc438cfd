"""Quality-gate records: a precision other than float32 runs only after it was measured against float32.

`inspectd export --precision P` (inspectd.toolkit.gate) runs the model at float32 and at P on a
labelled validation set, compares image ROC-AUC, pixel ROC-AUC and region IoU, and writes the
outcome here, under the cache dir the daemon reads, keyed by the model's sha256, the runtime and
the precision. The daemon refuses a non-float32 precision without a passed record (one line,
naming the command that makes it). This module is on the daemon's path: JSON only.
"""

from __future__ import annotations

__all__ = ["gate_file", "save_gate", "require_gate", "check_int8", "GATE_FORMAT"]

import json
import os
from pathlib import Path

from inspectd.errors import ConfigError
from inspectd.model.export import STAMP

GATE_FORMAT = "inspectd.gate/1"
_FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino", "tensorflow": "tensorflow"}


def gate_file(cache_root: Path, sha256: str, runtime: str, precision: str) -> Path:
    return Path(cache_root) / "gates" / f"{sha256[:32]}-{runtime}-{precision}.json"


def save_gate(cache_root: Path, record: dict) -> Path:
    """Write `record` (with sha256, runtime, precision) in place atomically; returns its path."""
    path = gate_file(cache_root, record["sha256"], record["runtime"], record["precision"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"format": GATE_FORMAT, **record}, indent=1) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def require_gate(cache_root: Path, sha256: str, name: str, runtime: str, precision: str) -> dict:
    """The passed record of `precision` with `runtime` for this model, or ConfigError naming the command to run."""
    path = gate_file(cache_root, sha256, runtime, precision)
    how = f"inspectd export MODEL --runtime {runtime} --precision {precision}"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"model.precision {precision}: model {name} has not been checked against float32 with {runtime} "
            f"(no quality gate in {path.parent}); run `{how}` with the same cache_dir"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.precision {precision}: cannot read the quality gate {path}: {exc}") from None
    if not record.get("passed"):
        raise ConfigError(
            f"model.precision {precision}: model {name} failed its quality gate against float32 with {runtime} "
            f"({record.get('why', 'see ' + str(path))}); use float32"
        )
    return record


def check_int8(record: dict, entry: Path, name: str) -> None:
    """ConfigError unless the INT8 model in `entry` is the one the gate `record` measured: each INT8 export writes
    a new id into the model's stamp and its gate record, so a model replaced after its gate (a second export into
    the same cache that did not finish) is never run on the first one's pass."""
    try:
        made = json.loads((entry / STAMP).read_text()).get("id")
    except (OSError, ValueError):
        made = None
    if made is None or record.get("int8_id") != made:
        raise ConfigError(
            f"model.precision int8: the INT8 model of {name} in {entry} is not the one its quality gate measured; "
            "run `inspectd export MODEL --runtime R --int8` again"
        )
