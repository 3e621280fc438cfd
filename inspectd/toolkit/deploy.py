"""`inspectd export`: get a model ready for the daemon ahead of time, into the cache it reads.

- float32 with a named runtime: the conversion (ONNX, OpenVINO IR), as the daemon would do at start.
- `--runtime auto`: every installed runtime converted and measured on the CPU at float32
  (`inspectd.pipeline.autotune`), the table printed and cached: a daemon at float32 on the CPU then
  starts on the choice without measuring.
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
import uuid
from dataclasses import dataclass
from pathlib import Path

from inspectd.errors import ConfigError, DataError, UsageError
from inspectd.model import export, gates, quantize
from inspectd.model.deployable import Deployable, load_model, resolve_model_path
from inspectd.pipeline import autotune, runtimes
from inspectd.pipeline.context import TUNED_BATCHES
from inspectd.pipeline.engine import select_device, tune
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
    # a one-line error before any work; TensorFlow's float16 runs on a GPU: checked on the device the gate will use
    device = select_device("auto") if opts.runtime == "tensorflow" else "/CPU:0"
    try:
        runtimes.resolve_runtime(opts.runtime, device, opts.precision)
    except ConfigError as exc:  # said in the config's words; here it is the command line that asked
        raise UsageError(f"--runtime {opts.runtime} --precision {opts.precision}: {exc}") from None
    if deployable.model is None and (opts.precision == "int8" or (opts.precision == "float32" and opts.runtime != "auto")):
        raise UsageError(
            f"{opts.model}: an exported model already; convert and quantize from the .keras file it came from "
            "(an exported model takes --runtime auto, or --precision bfloat16|float16 for its gate)"
        )
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
        target = export.export_folder(deployable, fmt, opts.out)
        where = f'an exported model: model.path = "{opts.out}" runs it, no TensorFlow needed'
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


def _disjoint(opts: ExportOptions) -> None:
    """The gate measures on images the calibration never saw: two folders given must not hold each other."""
    if opts.calibration is None or opts.validation is None:
        return  # the defaults are the training run's train and validation splits, apart by construction
    cal, val = opts.calibration.resolve(), opts.validation.resolve()
    if cal == val or cal in val.parents or val in cal.parents:
        raise UsageError(
            f"--calibration {opts.calibration} and --validation {opts.validation} overlap: the gate must "
            "measure on images the calibration did not see"
        )


def _gated(deployable: Deployable, opts: ExportOptions) -> int:
    root = export.cache_root(opts.cache_dir)
    _disjoint(opts)
    data = gating.validation_set(deployable, opts.validation)
    source = str(opts.validation) if opts.validation else f"the validation split of {deployable.meta['training']['dataset']}"
    gating.check_validation(data, source)  # before anything is written or replaced
    record_of = {"sha256": deployable.sha256, "runtime": opts.runtime, "precision": opts.precision, "name": deployable.name}
    gate = gates.gate_file(root, deployable.sha256, opts.runtime, opts.precision)
    previous = gate.read_text() if gate.is_file() else None
    entry = None
    try:
        if opts.precision == "int8":
            # Replacing the INT8 model voids its old record: until the gate passes, no daemon may run the new one.
            gates.save_gate(root, {**record_of, "passed": False, "why": "a new INT8 model is being measured"})
            entry = _int8(deployable, opts)
        record = gating.run_gate(deployable, opts.runtime, opts.precision, data, opts.tolerance, opts.cache_dir, source)
    except BaseException as exc:  # a crash, Ctrl-C: no unmeasured INT8 model stays; an earlier record comes back
        if entry is not None:
            shutil.rmtree(entry, ignore_errors=True)
        if opts.precision == "int8":
            gates.save_gate(root, {**record_of, "passed": False, "why": f"export stopped: {type(exc).__name__}: {exc}"[:300]})
        elif previous is not None:
            gate.write_text(previous)
        raise
    if entry is not None:
        stamp = json.loads((entry / export.STAMP).read_text())
        record["calibration"], record["int8_id"] = stamp["calibration"], stamp["id"]  # the model this gate measured
    path = gates.save_gate(root, record)
    print(gating.format_gate(record))
    if not record["passed"]:
        if entry is not None:
            shutil.rmtree(entry, ignore_errors=True)
        raise DataError(
            f"quality gate refused {opts.precision} for {deployable.name} with {opts.runtime}: {record['why']} "
            f"(the record: {path}; tolerances: --max-image-auc-drop, --max-pixel-auc-drop, --max-iou-drop, "
            "--max-verdict-change)"
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
        "quantizer": export.quantizer_version(fmt),
        "id": uuid.uuid4().hex,  # this INT8 model; its gate record names it (gates.check_int8)
    }

    def write(folder: Path) -> None:
        quantize.quantize(fmt, fp32, images, folder / fp32.name)  # OpenVINO writes the .bin beside the .xml
        (folder / export.STAMP).write_text(json.dumps(stamp, indent=2) + "\n")

    return export.store_entry(export.int8_entry(deployable, fmt, opts.cache_dir), write)
