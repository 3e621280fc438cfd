"""Batched single-pass inference: RGB uint8 images of any size -> score and cam_logits per image.

Preprocessing is uint8 -> float, antialiased bilinear resize to the model input (the input
normalization is inside the model), the same kernel whatever the runtime. With TensorFlow it is
`preprocess`, run with the forward pass in one shape-polymorphic `tf.function` on the device
(every function traced once; batches padded to a few sizes, "buckets"). With ONNX Runtime or
OpenVINO (runtimes.py) it is `inspectd.pipeline.resize`, TensorFlow's kernel in NumPy (within
2e-3 grey levels of it; no ONNX or OpenVINO operator has it: ONNX `Resize` with antialias differs
by up to 12 grey levels, OpenVINO ignores the flag; measured), so those runtimes need no
TensorFlow at all; a frame already at the input size is only cast.
The daemon uses `InferenceEngine` directly, the offline tools through `Predictor`.
"""

from __future__ import annotations

__all__ = ["RESIZE", "Prediction", "Predictor", "InferenceEngine", "preprocess", "select_device", "with_policy", "tune"]

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from inspectd import __version__
from inspectd.errors import ConfigError, InspectdError, ModelFileError
from inspectd.model import export, gates
from inspectd.model.deployable import Deployable, config_nodes
from inspectd.pipeline import autotune, resize, runtimes  # modules, not names: their functions are looked up at each call

log = logging.getLogger("inspectd.pipeline.engine")

K = TypeVar("K")  # what `Predictor.stream` carries beside each image

# One resize everywhere (training, infer, evaluate, daemon): bilinear with antialiasing, so a
# model never sees a different interpolation in production than in training.
RESIZE = {"method": "bilinear", "antialias": True}


def preprocess(batch, size: tuple[int, int]):
    """uint8 [n, H, W, 3] -> float32 [n, h, w, 3] 0..255 at `size` (h, w): the model's input, every runtime."""
    import tensorflow as tf

    return tf.image.resize(batch, size, **RESIZE)


@dataclass(frozen=True)
class Prediction:
    score: float
    cam_logits: np.ndarray  # [h, w] float32


def with_policy(model, policy: str):
    """A copy of `model` whose float32 layers compute in `policy` (e.g. mixed_float16), same weights.

    A loaded model keeps the dtype policy saved in its config, so the global Keras policy would not
    apply: the config is rewritten instead (only the DTypePolicy entries change).
    """
    import keras

    config = model.get_config()
    for node in config_nodes(config):
        if node["class_name"] == "DTypePolicy" and node["config"].get("name") == "float32":
            node["config"]["name"] = policy
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def select_device(device: str, tensorflow: bool = True) -> str:
    """'auto' -> the first GPU when TensorFlow sees one (memory growth on), else the CPU. For an exported model
    (`tensorflow=False`) or without TensorFlow, TensorFlow is not asked (nor imported): 'auto' is the CPU and
    "gpu:N" is passed on to ONNX Runtime's CUDA provider."""
    if not tensorflow or not runtimes.installed("tensorflow"):
        return "/CPU:0" if device in ("auto", "cpu") else f"/GPU:{int(device.split(':')[1])}"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised (a reload): growth was set the first time
            pass
    if device == "cpu" or (device == "auto" and not gpus):
        return "/CPU:0"
    index = 0 if device == "auto" else int(device.split(":")[1])
    if index >= len(gpus):
        raise ConfigError(f"model.device: {device!r} but TensorFlow sees {len(gpus)} GPU(s)")
    return f"/GPU:{index}"


def _policy(precision: str) -> str | None:
    """The Keras dtype policy TensorFlow runs `precision` with (None: float32 as saved)."""
    return {"float32": None, "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[precision]


def tune(
    deployable: Deployable,
    device: str,
    xla: bool,
    precision: str,
    cache_dir: Path | None,
    batches: Sequence[int],
    seconds: float = autotune.SECONDS,
    fresh: bool = False,
) -> autotune.Choice:
    """`runtime = "auto"`: the fastest (runtime, OpenVINO hint, batch size) for this model here, measured once per
    model, precision and machine (`inspectd.pipeline.autotune`). A precision other than float32 counts only the
    runtimes whose quality gate it passed; the table says why a candidate is missing."""
    tf_device = select_device(device, tensorflow=deployable.model is not None)
    root = export.cache_root(cache_dir)
    usable, skipped = [], []
    for runtime in runtimes.candidates(tf_device, precision, xla, deployable.graph_format):
        try:
            if precision != "float32":
                gates.require_gate(root, deployable.sha256, deployable.name, runtime, precision)
            if precision == "int8":
                export.cached_int8(deployable, runtimes.FORMAT_OF[runtime], cache_dir)
            usable.append(runtime)
        except InspectdError as exc:
            skipped.append(exc)
    if not usable:
        raise skipped[0] if skipped else ConfigError(f"model.runtime auto: nothing runs precision {precision} here")
    wanted = [
        autotune.Candidate(runtime, batch, hint)
        for runtime in usable
        for hint in (runtimes.OPENVINO_HINTS if runtime == "openvino" else ("",))
        for batch in sorted(set(batches))
    ]

    def opener(runtime: str, hint: str):
        engine = InferenceEngine(
            deployable, tuple(sorted(set(batches))), device, xla, precision, runtime, cache_dir, hint or "LATENCY"
        )
        return engine.infer

    w, h = deployable.input_size
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        choice = autotune.choose(
            opener,
            wanted,
            frame,
            sha256=deployable.sha256,
            precision=precision,
            tf_device=tf_device,
            # the key: XLA's numbers differ; an exported graph has other candidates than its .keras source
            versions={
                **runtimes.versions(),
                "inspectd": __version__,
                "xla": str(xla),
                "graph": deployable.graph_format or "keras",
            },
            cache_root=root,
            seconds=seconds,
            fresh=fresh,
        )
    except RuntimeError as exc:
        raise ModelFileError(f"model.runtime auto: {exc}") from None
    for reason in skipped:
        log.info("runtime auto: not a candidate: %s", reason)
    return choice


class InferenceEngine:
    """The daemon's model call: uint8 frames -> (score [n], cam_logits [n, h, w]).

    `runtime` tensorflow: one `tf.function` does `preprocess` and the forward pass on the device.
    onnxruntime / openvino: the model converted once (`inspectd.model.export`, cached in
    `cache_dir`) runs in that runtime after `preprocess`; `auto` measures which is fastest here
    (`tune`; `choice` keeps the table, `runtime_reason` says why). `precision` is float32 unless
    set, in every runtime; another precision needs its passed quality gate (`gated=False`: the gate
    itself, measuring it). TensorFlow's batches are zero-padded to one of a few sizes
    ("buckets", as TF Serving's allowed_batch_sizes), all run at warm-up (the others take any batch
    size as it is); the signatures are shape-polymorphic, so every function is traced once, and
    `traces()` lets tests prove nothing is retraced afterwards.
    """

    def __init__(
        self,
        deployable: Deployable,
        buckets: tuple[int, ...],
        device: str = "auto",
        xla: bool = False,
        precision: str = "float32",
        runtime: str = "tensorflow",
        cache_dir: Path | None = None,
        hint: str = "LATENCY",
        gated: bool = True,
        choice: autotune.Choice | None = None,
    ):
        self.deployable = deployable
        self.buckets = tuple(sorted(buckets))
        self.device = select_device(device, tensorflow=deployable.model is not None)
        self.precision = precision
        self.choice = None
        self.gate: dict | None = None
        runtime, self.runtime_reason = runtimes.resolve_runtime(runtime, self.device, precision, xla, deployable.graph_format)
        auto = runtime == "auto"
        if auto:
            self.choice = choice or tune(deployable, device, xla, precision, cache_dir, (self.buckets[-1],))
            runtime, hint = self.choice.best.runtime, self.choice.best.hint or hint
        self.runtime, self.hint = runtime, hint
        if precision != "float32" and gated:
            root = export.cache_root(cache_dir)
            self.gate = gates.require_gate(root, deployable.sha256, deployable.name, runtime, precision)
        w, h = deployable.input_size
        self._size = (h, w)
        self._session = None
        self._run: Any = None  # the TensorFlow runtime's tf.function
        if self.runtime != "tensorflow":
            self._session = self._open_auto(cache_dir, xla) if auto else self._open_exported(cache_dir)
        if self.choice is not None:
            self.runtime_reason = f"auto: the fastest measured here: {self.choice.summary()}"
        if self._session is not None:
            return
        import tensorflow as tf

        self._tf = tf
        policy = _policy(precision)
        model = deployable.model if policy is None else with_policy(deployable.model, policy)

        # XLA compiles the model only: the antialiased resize (ScaleAndTranslate) has no XLA kernel.
        @tf.function(jit_compile=xla)
        def forward(x):
            out = model(x, training=False)
            return tf.cast(out["score"], tf.float32), tf.cast(out["cam_logits"], tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def run(batch):
            return forward(preprocess(batch, (h, w)))

        self._run = run

    def _open_auto(self, cache_dir: Path | None, xla: bool):
        """`auto`'s choice opened; if a cached choice no longer opens (a damaged cache, a changed library), it is
        measured again, the failing runtime losing, and what wins is opened (TensorFlow: no session)."""
        try:
            return self._open_exported(cache_dir)
        except InspectdError as exc:
            if self.choice is None or not self.choice.cached:
                raise
            log.warning("runtime auto: the cached choice %s does not open (%s); measuring again", self.runtime, exc)
        d = self.deployable
        device = "cpu" if self.device.startswith("/CPU") else "gpu:" + self.device.rsplit(":", 1)[1]
        self.choice = tune(d, device, xla, self.precision, cache_dir, (self.buckets[-1],), fresh=True)
        self.runtime, self.hint = self.choice.best.runtime, self.choice.best.hint or "LATENCY"
        return None if self.runtime == "tensorflow" else self._open_exported(cache_dir)

    def _open_exported(self, cache_dir: Path | None):
        """The ONNX Runtime / OpenVINO session on the cached export, checked on one frame. A cached float32
        conversion that does not load is converted again, once; an INT8 one is `inspectd export`'s to remake."""
        fmt = runtimes.FORMAT_OF[self.runtime]

        def session(path: Path):
            return self._checked(runtimes.open_session(self.runtime, path, self.device, self.precision, self.hint))

        try:
            if self.precision == "int8":
                model = export.cached_int8(self.deployable, fmt, cache_dir)
                if self.gate is not None:
                    gates.check_int8(self.gate, model.parent, self.deployable.name)
                return session(model)
            for refresh in (False, True):
                exported = export.cached_export(self.deployable, fmt, cache_dir, refresh=refresh)
                try:
                    return session(exported)
                except InspectdError:
                    raise
                except Exception:  # noqa: BLE001 - the runtimes raise their own classes: convert afresh once
                    if refresh:
                        raise
        except InspectdError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the runtime, in one line
            raise ModelFileError(
                f"model.runtime {self.runtime}: cannot run the converted model: {type(exc).__name__}: {exc}"
            ) from None
        raise AssertionError("unreachable")

    def _checked(self, session):
        """The session, after one frame gave outputs of the deployable model's shapes."""
        h, w = self._size
        scores, cams = session(np.zeros((1, h, w, 3), np.float32))
        cam_h, cam_w = (int(self.deployable.meta["cam"][k]) for k in ("height", "width"))
        if scores.shape != (1,) or cams.shape != (1, cam_h, cam_w):
            raise ValueError(f"outputs {scores.shape} and {cams.shape}, expected (1,) and (1, {cam_h}, {cam_w})")
        return session

    def traces(self) -> int:
        """How often TensorFlow traced the model call (0 for the other runtimes: nothing is traced there)."""
        return 0 if self._run is None else int(self._run.experimental_get_tracing_count())

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _stack(self, images: list[np.ndarray], size: int) -> np.ndarray:
        """Pad to `size` frames; frames of different sizes are first resized to the model input.

        One copy at most: a single frame that needs no padding goes as a view of itself."""
        if any(im.shape != images[0].shape for im in images):
            images = [resize.resize(im[None], self._size)[0].round().clip(0, 255).astype(np.uint8) for im in images]
        if size == len(images):
            return images[0][None] if size == 1 else np.stack(images)
        batch = np.zeros((size, *images[0].shape), np.uint8)
        batch[: len(images)] = images
        return batch

    def infer(self, images: list[np.ndarray], interrupt: runtimes.Interrupt | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and cam_logits for up to max(buckets) RGB uint8 frames. `interrupt`: another thread may end the
        call early (ONNX Runtime only; it raises `runtimes.Interrupted`)."""
        if len(images) > self.buckets[-1]:
            raise ValueError(f"{len(images)} frames > largest bucket {self.buckets[-1]}")
        if self._session is not None:  # nothing is traced there, so no padding (a padded frame costs as a real one)
            return self._session(self._model_input(self._stack(images, len(images))), interrupt)
        batch = self._stack(images, self.bucket(len(images)))
        with self._tf.device(self.device):
            scores, cams = self._run(batch)
        return scores.numpy()[: len(images)], cams.numpy()[: len(images)]

    def _model_input(self, batch: np.ndarray) -> np.ndarray:
        """The resize for the exported runtimes (`inspectd.pipeline.resize`); a batch already at the input size is
        only cast."""
        return resize.resize(batch, self._size)

    def warmup(self, frame_size: tuple[int, int] | None = None) -> None:
        """Trace and run every bucket once (frame_size (w, h) defaults to the model input)."""
        w, h = frame_size or self.deployable.input_size
        for size in self.buckets:
            self.infer([np.zeros((h, w, 3), np.uint8)] * size)


class Predictor:
    """The offline tools' view of the engine: any number of images, batch by batch.

    >>> p = Predictor(load_model("demo.keras"), batch_size=4)
    >>> [pred.score for pred in p.predict([image_a, image_b])]
    """

    def __init__(self, deployable: Deployable, batch_size: int = 8, **engine):
        self.deployable = deployable
        self.batch_size = batch_size
        # The daemon's engine, so `infer`/`evaluate` preprocess exactly as production does (TensorFlow unless
        # `engine` names another runtime: InferenceEngine's keyword arguments; an exported model: the runtime that
        # reads its graph).
        if deployable.model is None and "runtime" not in engine:
            engine["runtime"] = "onnxruntime" if deployable.graph_format == "onnx" else "openvino"
        self._engine = InferenceEngine(deployable, (batch_size,), **engine)

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict any number of HxWx3 RGB uint8 images (the last batch is zero-padded)."""
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            scores, cams = self._engine.infer(list(images[start : start + self.batch_size]))
            out += [Prediction(float(score), cam) for score, cam in zip(scores, cams)]
        return out

    def stream(self, items: Iterable[tuple[K, np.ndarray]]) -> Iterator[tuple[K, np.ndarray, Prediction]]:
        """(key, image) pairs in, (key, image, prediction) out, batched without holding everything."""
        pending: list[tuple[K, np.ndarray]] = []
        for item in items:
            pending.append(item)
            if len(pending) == self.batch_size:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending):
        preds = self.predict([image for _, image in pending])
        return [(key, image, pred) for (key, image), pred in zip(pending, preds)]
