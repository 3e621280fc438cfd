"""Runtimes other than TensorFlow: ONNX Runtime and OpenVINO, each running the exported model graph.

A session takes float32 [n, h, w, 3] RGB 0..255 at the model's input size (the engine casts and
resizes before, the same way for every runtime) and returns (score [n], cam_logits [n, h', w']).
`resolve_runtime` turns `[model] runtime` ("auto" included) into one name and says why.
"""

from __future__ import annotations

__all__ = [
    "RUNTIMES",
    "AUTO_ORDER",
    "FORMAT_OF",
    "resolve_runtime",
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

RUNTIMES = ("auto", "tensorflow", "onnxruntime", "openvino")
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}
_PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
# `auto` on a CPU: the first of these that is installed. The order is what measured fastest on a
# CPU (docs/performance.md, "Runtimes"); TensorFlow when neither is installed.
AUTO_ORDER = ("onnxruntime", "openvino")

Session = Callable[..., tuple[np.ndarray, np.ndarray]]  # (batch, interrupt=None) -> (score, cam_logits)


def installed(runtime: str) -> bool:
    return runtime == "tensorflow" or importlib.util.find_spec(_PACKAGE[runtime]) is not None


def resolve_runtime(requested: str, tf_device: str, precision: str = "float32", xla: bool = False) -> tuple[str, str]:
    """(runtime, why) for `[model] runtime` on `tf_device` ("/CPU:0" or "/GPU:N")."""
    if requested not in RUNTIMES:
        raise ConfigError(f"model.runtime {requested!r}: use one of {', '.join(RUNTIMES)}")
    tf_only = [name for name, on in (("precision " + precision, precision != "float32"), ("xla", xla)) if on]
    if requested == "auto":
        if tf_device.startswith("/GPU"):
            return "tensorflow", "auto: a GPU (TensorFlow's CUDA path; the others run here on the CPU)"
        if tf_only:
            return "tensorflow", f"auto: model.{' and '.join(tf_only)} are TensorFlow settings"
        for runtime in AUTO_ORDER:
            if installed(runtime):
                return runtime, "auto: the fastest installed runtime on a CPU (measured, docs/performance.md)"
        return "tensorflow", "auto: neither onnxruntime nor openvino is installed (pip install 'inspectd[onnx]')"
    if requested != "tensorflow":
        if tf_only:
            raise ConfigError(f"model.{' and '.join(tf_only)}: TensorFlow settings, but model.runtime is {requested}")
        if tf_device.startswith("/GPU") and requested == "openvino":
            raise ConfigError("model.runtime openvino runs on the CPU here; set model.device cpu, or runtime tensorflow")
        if not installed(requested):
            raise UnavailableError(
                f"model.runtime {requested}: the {_PACKAGE[requested]} package is not installed: "
                f"pip install 'inspectd[{_EXTRA[requested]}]'"
            )
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


def _onnxruntime(path: Path, tf_device: str) -> Session:
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


def compile_openvino(path: Path):
    """The OpenVINO model `path` compiled for the CPU, precision float32 on every CPU."""
    import openvino as ov

    # LATENCY: one request at a time uses all cores (the daemon runs one batch at a time). No pinning of its
    # threads to cores: the daemon's own threads share them (pipeline 9.85 and 10.25 vs 9.3 and 9.47 frames/s
    # pinned, EfficientNetV2B0 752x480, docs/performance.md). Precision pinned to float32: the CPU plugin's
    # default is bfloat16 on CPUs that have it (AVX-512 BF16, AMX), which moves scores by up to 5e-3 and
    # would make the daemon's outputs depend on the CPU it happens to run on.
    return ov.Core().compile_model(
        str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32"}
    )


def _openvino(path: Path, tf_device: str) -> Session:
    compiled = compile_openvino(path)
    request = compiled.create_infer_request()
    score, cam_logits = compiled.output("score"), compiled.output("cam_logits")

    def run(x: np.ndarray, interrupt: Interrupt | None = None) -> tuple[np.ndarray, np.ndarray]:
        out = request.infer({0: x})  # copies the outputs (share_outputs=False); runs to its end, interrupt or not
        return out[score], out[cam_logits]

    return run


def open_session(runtime: str, path: Path, tf_device: str) -> Session:
    """A callable `(batch, interrupt=None) -> (score, cam_logits)` running the exported model file `path` with
    `runtime`."""
    return {"onnxruntime": _onnxruntime, "openvino": _openvino}[runtime](path, tf_device)
