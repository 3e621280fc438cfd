"""`inspectd export`: get a model ready for the daemon ahead of time, into the cache it reads.

- float32 with a named runtime: the conversion (ONNX, OpenVINO IR), as the daemon would do at start.
- `--runtime auto`: every installed runtime converted and measured (`inspectd.pipeline.autotune`),
  the table printed and cached: the daemon then starts on the choice without measuring.
- `--precision bfloat16|float16`: the quality gate against float32 (`inspectd.toolkit.gate`); its
  record lets the daemon run that precision.
- `--precision int8` (`--int8`): calibrate and quantize (`inspectd.model.quantize`), then the gate;
  the INT8 model stays in the cache only if the gate passed.
"""

from __future__ import annotations

__all__ = ["ExportOptions", "run_export"]

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from inspectd.errors import ConfigError, DataError, UsageError
from inspectd.model import export, gates, quantize
from inspectd.model.deployable import Deployable, load_model, resolve_model_path
from inspectd.pipeline import autotune, runtimes
from inspectd.pipeline.context import TUNED_BATCHES
from inspectd.pipeline.engine import tune
from inspectd.toolkit import gate as gating

FORMAT_OF_RUNTIME = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass(frozen=True)
class ExportOptions:
    model: str
    runtime: str  # auto | tensorflow | onnxruntime | openvino
    precision: str = "float32"
    cache_dir: Path | None = None
    out: Path | None = None
    calibration: Path | None = None
    validation: Path | None = None
    tolerance: gating.Tolerance = gating.Tolerance()
    seconds: float = autotune.SECONDS  # --runtime auto: measuring time per candidate


def _say(text: str) -> None:
    print(f"inspectd export: {text}", file=sys.stderr, flush=True)


def run_export(opts: ExportOptions) -> int:
    """Do what the options ask; print what was written (and the tables) on stdout. Exit code 0, or an error."""
    deployable = load_model(resolve_model_path(opts.model))
    try:  # a one-line error before any work
        runtimes.resolve_runtime(opts.runtime, "/CPU:0", opts.precision)
    except ConfigError as exc:  # said in the config's words; here it is the command line that asked
        raise UsageError(f"--runtime {opts.runtime} --precision {opts.precision}: {exc}") from None
    if opts.out is not None and (opts.precision != "float32" or opts.runtime in ("auto", "tensorflow")):
        raise UsageError("--out writes one float32 conversion: give --runtime onnxruntime or openvino, no --precision")
    if opts.runtime == "auto":
        if opts.precision != "float32":
            raise UsageError(f"--precision {opts.precision}: name the runtime it is for (--runtime onnxruntime|openvino)")
        return _auto(deployable, opts)
    if opts.precision == "float32":
        return _float32(deployable, opts)
    return _gated(deployable, opts)


def _float32(deployable: Deployable, opts: ExportOptions) -> int:
    if opts.runtime == "tensorflow":
        raise UsageError("--runtime tensorflow runs the .keras file itself: nothing to export at float32")
    fmt = FORMAT_OF_RUNTIME[opts.runtime]
    _say(f"converting {deployable.name} to {fmt} (tens of seconds)")
    if opts.out:
        target = export.export(deployable, fmt, opts.out)
        where = "a copy for other tools"
    else:
        target = export.cached_export(deployable, fmt, opts.cache_dir)
        where = f"in the cache {export.cache_root(opts.cache_dir)}: a daemon using it will not convert again"
    w, h = deployable.input_size
    print(f"wrote {target} ({where}); input 'image' float32 [N,{h},{w},3] RGB 0..255, outputs 'score' [N] and 'cam_logits'")
    return 0


def _auto(deployable: Deployable, opts: ExportOptions) -> int:
    _say(f"measuring every installed runtime on {deployable.name} at batch sizes {TUNED_BATCHES}, up to {opts.seconds} s each")
    choice = tune(deployable, "cpu", False, "float32", opts.cache_dir, TUNED_BATCHES, opts.seconds, fresh=True)
    print(autotune.format_table(choice))
    print(f"cached in {export.cache_root(opts.cache_dir) / 'autotune'}: a daemon with runtime auto starts on it")
    return 0


def _gated(deployable: Deployable, opts: ExportOptions) -> int:
    root = export.cache_root(opts.cache_dir)
    data = gating.validation_set(deployable, opts.validation)
    source = str(opts.validation) if opts.validation else f"the validation split of {deployable.meta['training']['dataset']}"
    pending = {"sha256": deployable.sha256, "runtime": opts.runtime, "precision": opts.precision}
    gates.save_gate(root, {**pending, "name": deployable.name, "passed": False, "why": "being measured"})
    entry = None
    if opts.precision == "int8":
        entry = _int8(deployable, opts)
    record = gating.run_gate(deployable, opts.runtime, opts.precision, data, opts.tolerance, opts.cache_dir, source)
    if entry is not None:
        record["calibration"] = json.loads((entry / export.STAMP).read_text())["calibration"]
    path = gates.save_gate(root, record)
    print(gating.format_gate(record))
    if not record["passed"]:
        if entry is not None:
            shutil.rmtree(entry, ignore_errors=True)
        raise DataError(
            f"quality gate refused {opts.precision} for {deployable.name} with {opts.runtime}: {record['why']} "
            f"(the record: {path}; tolerances: --max-image-auc-drop, --max-pixel-auc-drop, --max-iou-drop)"
        )
    kept = f"the INT8 model {entry}" if entry is not None else f"precision {opts.precision}"
    print(f'passed: {kept} may run (model.precision = "{opts.precision}", model.runtime = "{opts.runtime}"); record {path}')
    return 0


def _int8(deployable: Deployable, opts: ExportOptions) -> Path:
    """Calibrate and quantize into the cache (the gate runs the cached model; a refusal removes it)."""
    fmt = FORMAT_OF_RUNTIME.get(opts.runtime)
    if fmt is None:
        raise UsageError("--int8 is for --runtime onnxruntime or openvino")
    fp32 = export.cached_export(deployable, fmt, opts.cache_dir)
    images = gating.calibration_images(deployable, opts.calibration)
    source = str(opts.calibration) if opts.calibration else "the training split"
    _say(f"quantizing {deployable.name} for {opts.runtime} with {len(images)} calibration images ({source})")
    stamp = {
        "sha256": deployable.sha256,
        "name": deployable.name,
        "format": fmt,
        "precision": "int8",
        "calibration": {"source": source, "images": len(images)},
    }

    def write(folder: Path) -> None:
        quantize.quantize(fmt, fp32, images, folder / fp32.name)  # OpenVINO writes the .bin beside the .xml
        (folder / export.STAMP).write_text(json.dumps(stamp, indent=2) + "\n")

    return export.store_entry(export.int8_entry(deployable, fmt, opts.cache_dir), write)
