"""Runtimes other than TensorFlow: ONNX Runtime and OpenVINO, each running the exported model graph.

A session takes float32 [n, h, w, 3] RGB 0..255 at the model's input size (the engine casts and
resizes before, the same way for every runtime) and returns (score [n], cam_logits [n, h', w']).
`resolve_runtime` checks a named `[model] runtime` against the device and precision; `candidates`
lists what `auto` measures (`inspectd.pipeline.autotune`).

Precision is explicit (`[model] precision`): float32 unless configured, pinned in every runtime
(OpenVINO's CPU plugin would otherwise run bfloat16 on CPUs that have it), so the outputs are the
same on every CPU. `SUPPORTED` says which runtime runs which precision.
"""

from __future__ import annotations

__all__ = [
    "RUNTIMES",
    "PRECISIONS",
    "SUPPORTED",
    "OPENVINO_HINTS",
    "FORMAT_OF",
    "READS",
    "resolve_runtime",
    "check_precision",
    "candidates",
    "versions",
    "open_session",
    "installed",
    "compile_openvino",
    "Interrupt",
    "Interrupted",
]

import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from inspectd.errors import ConfigError, UnavailableError
from inspectd.model.ovcore import openvino_core

RUNTIMES = ("auto", "tensorflow", "onnxruntime", "openvino")
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}
_PACKAGE = {"tensorflow": "tensorflow", "onnxruntime": "onnxruntime", "openvino": "openvino"}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# Which runtime runs which precision. TensorFlow: Keras' mixed policies (float16 for GPUs with tensor cores);
# ONNX Runtime's CPU provider has no bfloat16/float16 kernels worth the name, but runs a statically quantized
# INT8 graph; OpenVINO: its inference precision hint (bf16/f16 where the CPU has them), INT8 from NNCF.
SUPPORTED = {
    "tensorflow": ("float32", "bfloat16", "float16"),
    "onnxruntime": ("float32", "int8"),
    "openvino": ("float32", "bfloat16", "float16", "int8"),
}
# OpenVINO's INFERENCE_PRECISION_HINT per precision (an INT8 graph carries its own quantized operations; what
# is left of it runs float32) and the CPU capability each needs.
_OV_HINT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "f32"}
_OV_CAPABILITY = {"bfloat16": "BF16", "float16": "FP16"}
# OpenVINO's PERFORMANCE_HINT values `auto` measures. LATENCY (the default): one request uses every core.
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")

Session = Callable[..., tuple[np.ndarray, np.ndarray]]  # (batch, interrupt=None) -> (score, cam_logits)


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[runtime]) is not None


def versions() -> dict[str, str]:
    """{package: version} of the installed runtimes (part of `auto`'s cache key: an upgrade measures again)."""
    from importlib import metadata

    out = {}
    for package in ("tensorflow", "onnxruntime", "openvino"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_precision(runtime: str, precision: str, tf_device: str = "/CPU:0") -> None:
    """ConfigError/UnavailableError, one line, when `runtime` cannot run `precision` on `tf_device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision not in SUPPORTED[runtime]:
        can = [name for name, ok in SUPPORTED.items() if precision in ok]
        raise ConfigError(f"model.precision {precision}: {runtime} does not run it (use model.runtime {' or '.join(can)})")
    if runtime == "openvino" and precision in _OV_CAPABILITY:
        core = openvino_core()
        if _OV_CAPABILITY[precision] not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise UnavailableError(
                f"model.precision {precision}: this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) "
                f"has no {precision} support in OpenVINO; use float32 or int8"
            )
    if runtime == "tensorflow" and precision == "float16" and not tf_device.startswith("/GPU"):
        raise ConfigError("model.precision float16 with tensorflow needs a GPU (on a CPU: runtime openvino)")


# What reads an exported model's graph (`graph_format`): ONNX Runtime ONNX, OpenVINO both; TensorFlow neither.
READS = {"onnxruntime": ("onnx",), "openvino": ("onnx", "openvino"), "tensorflow": ()}


def candidates(tf_device: str, precision: str, xla: bool = False, graph_format: str | None = None) -> list[str]:
    """The runtimes `auto` may measure for this device and precision: installed, able to run it (and, for an
    exported model, able to read its `graph_format`)."""
    if xla:
        return [] if graph_format is not None else ["tensorflow"]  # XLA is TensorFlow's; an exported graph is not
    out = []
    for runtime in ("onnxruntime", "openvino", "tensorflow"):
        if not installed(runtime) or precision not in SUPPORTED[runtime]:
            continue
        if graph_format is not None and graph_format not in READS[runtime]:
            continue
        if tf_device.startswith("/GPU") and runtime == "openvino":
            continue  # its GPU plugin is Intel's; the CUDA path is TensorFlow's or ONNX Runtime's
        try:
            check_precision(runtime, precision, tf_device)
        except (ConfigError, UnavailableError):
            continue
        out.append(runtime)
    return out


def resolve_runtime(
    requested: str, tf_device: str, precision: str = "float32", xla: bool = False, graph_format: str | None = None
) -> tuple[str, str]:
    """(runtime, why) for a named `[model] runtime` on `tf_device` ("/CPU:0" or "/GPU:N"); "auto" stays "auto"
    (what it runs is measured: `inspectd.pipeline.autotune`). `graph_format`: an exported model's ("onnx",
    "openvino"), which only some runtimes read."""
    if requested not in RUNTIMES:
        raise ConfigError(f"model.runtime {requested!r}: use one of {', '.join(RUNTIMES)}")
    if requested == "auto":
        if not candidates(tf_device, precision, xla, graph_format):
            what = f" an exported {graph_format} model at" if graph_format else ""
            hint = ": pip install 'inspectd[slim]'" if graph_format else ""
            raise UnavailableError(f"model.runtime auto: no installed runtime runs{what} precision {precision} here{hint}")
        return "auto", "auto: measured"
    if graph_format is not None and graph_format not in READS[requested]:
        readers = " or ".join(r for r, formats in READS.items() if graph_format in formats)
        raise ConfigError(
            f"model.runtime {requested} cannot run the model: an exported {graph_format} graph, which {readers} runs"
        )
    if requested != "tensorflow":
        if xla:
            raise ConfigError(f"model.xla: a TensorFlow setting, but model.runtime is {requested}")
        if tf_device.startswith("/GPU") and requested == "openvino":
            raise ConfigError("model.runtime openvino runs on the CPU here; set model.device cpu, or runtime tensorflow")
    if not installed(requested):
        extra = "slim" if graph_format is not None else _EXTRA.get(requested, requested)
        raise UnavailableError(
            f"model.runtime {requested}: the {_PACKAGE[requested]} package is not installed: pip install 'inspectd[{extra}]'"
        )
    check_precision(requested, precision, tf_device)
    return requested, "configured"


class Interrupted(Exception):
    """A model call ended early by its `Interrupt`."""


class Interrupt:
    """Ends a model call in flight from another thread (a shadow model's call, when production needs the cores).

    ONNX Runtime stops between two operators (`RunOptions.terminate`); the other runtimes run the call to its end.
    `set()` is safe from any thread; the call in flight, or the next one if none is (a set() that came while the
    caller was getting ready), then raises `Interrupted`, until `clear()`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._options = None  # the RunOptions of the call in flight
        self._pending = False  # set() with no call in flight: the next call ends at once
        self._set = False

    def clear(self) -> None:
        """Forget a set() that came before now (the caller is about to decide whether to call)."""
        with self._lock:
            self._pending = False

    def arm(self, options):
        with self._lock:
            self._options, self._set = options, self._pending
            if self._pending:
                options.terminate = True
        return options

    def disarm(self) -> None:
        with self._lock:
            self._options, self._pending = None, False

    def set(self) -> None:
        with self._lock:
            if self._options is not None:
                self._options.terminate = True
                self._set = True
            else:
                self._pending = True

    def is_set(self) -> bool:
        with self._lock:
            return self._set


def _onnxruntime(path: Path, tf_device: str, precision: str, hint: str) -> Session:
    import onnxruntime as ort

    providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
    if tf_device.startswith("/GPU"):
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia-* pip packages
            ort.preload_dlls()  # (which tensorflow[and-cuda] installs), no LD_LIBRARY_PATH needed
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UnavailableError(
                "model.runtime onnxruntime on a GPU needs the onnxruntime-gpu package (CUDAExecutionProvider is not available)"
            )
        providers = [("CUDAExecutionProvider", {"device_id": int(tf_device.rsplit(":", 1)[1])}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    # No spinning: after each run ONNX Runtime's intra-op threads would busy-wait for the next one, taking the
    # cores from everything else: another model's session (two models in turn: 10.3 frames/s each spinning, 13-15
    # not), post-processing, the cameras. One model alone: the same within noise (docs/models.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if tf_device.startswith("/GPU") and "CUDAExecutionProvider" not in session.get_providers():
        raise UnavailableError(
            "model.runtime onnxruntime: the CUDA provider did not load (ONNX Runtime would run "
            "on the CPU); check the CUDA libraries, or set model.device cpu"
        )
    feed = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray, interrupt: Interrupt | None = None) -> tuple[np.ndarray, np.ndarray]:
        options = interrupt.arm(ort.RunOptions()) if interrupt is not None else None
        try:
            out = dict(zip(names, session.run(None, {feed: x}, options)))
        except Exception:
            if interrupt is not None and interrupt.is_set():
                raise Interrupted("the call was interrupted") from None
            raise
        finally:
            if interrupt is not None:
                interrupt.disarm()
        return out["score"], out["cam_logits"]

    return run


def compile_openvino(path: Path, precision: str = "float32", hint: str = "LATENCY"):
    """The OpenVINO model `path` compiled for the CPU at `precision` (float32: on every CPU)."""
    # LATENCY: one request at a time uses all cores (the daemon runs one batch at a time). No pinning of its
    # threads to cores: the daemon's own threads share them (pipeline 9.85 and 10.25 vs 9.3 and 9.47 frames/s
    # pinned, EfficientNetV2B0 752x480, docs/performance.md). Precision always set: the CPU plugin's
    # default is bfloat16 on CPUs that have it (AVX-512 BF16, AMX), which moves scores by up to 5e-3 and
    # would make the daemon's outputs depend on the CPU it happens to run on.
    return openvino_core().compile_model(
        str(path),
        "CPU",
        {"PERFORMANCE_HINT": hint, "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": _OV_HINT[precision]},
    )


def _openvino(path: Path, tf_device: str, precision: str, hint: str) -> Session:
    compiled = compile_openvino(path, precision, hint)
    request = compiled.create_infer_request()
    score, cam_logits = compiled.output("score"), compiled.output("cam_logits")

    def run(x: np.ndarray, interrupt: Interrupt | None = None) -> tuple[np.ndarray, np.ndarray]:
        out = request.infer({0: x})  # copies the outputs (share_outputs=False); runs to its end, interrupt or not
        return out[score], out[cam_logits]

    return run


def open_session(runtime: str, path: Path, tf_device: str, precision: str = "float32", hint: str = "LATENCY") -> Session:
    """A callable `(batch, interrupt=None) -> (score, cam_logits)` running the exported model file `path` with
    `runtime` at `precision` (`hint`: OpenVINO's PERFORMANCE_HINT)."""
    return {"onnxruntime": _onnxruntime, "openvino": _openvino}[runtime](path, tf_device, precision, hint)
