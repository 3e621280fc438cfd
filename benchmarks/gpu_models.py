#!/usr/bin/env python
"""Bare forward pass of deployable models on an accelerator, per precision, compiled vs eager (not run in CI).

    KERAS_BACKEND=jax python benchmarks/gpu_models.py --out runs/gpu.json [--models demo v2b0 PATH.keras ...]
        [--batches 1 8 32] [--precisions float32 mixed_float16 mixed_bfloat16] [--modes jit eager]
        [--seconds 2] [--v2b0-size 752x480] [--deadline 240] [--allow-cpu]

`bash benchmarks/gpu.sh` runs it on a bare, offline GPU machine under Keras' JAX backend (TensorFlow
cannot be installed there). The same `.keras` artefact the daemon loads is measured, loaded with
`inspectd.model.deployable.load_model`. Models: `demo` (inspectd/assets/demo.keras) and `v2b0`, the
seed paper's network: EfficientNetV2B0 cut at stride 16 -> GAP -> Dropout -> Dense(1, sigmoid), random
weights (under JAX drawn with numpy: `numpy_initial_values`), built here, saved as a classifier and
turned into a deployable model by `inspectd convert`'s own function, then loaded like any model file.

For each model, precision (the model rebuilt from its config with the dtype policy replaced, same
weights: `with_policy`, as the engine's `precision`), mode and batch size: frames/s, per-batch
latency p50/p99 and the first call (trace + compile + run). One batch = uint8 frames at the model's
input size on the host -> device -> float -> forward -> score and cam_logits back on the host as
float32 (no resize: frames are already at the input size). Modes:
- jax: `jit` (jax.jit over model.stateless_call, weights passed as arguments), `eager` (the model
  called op by op: no XLA fusion), `predict` (model.predict_on_batch);
- tensorflow: `jit` (tf.function, jit_compile=True), `graph` (tf.function without XLA: the daemon's
  engine), `eager`, `predict`.
Every row's outputs are compared with the float32 `jit` row of the same model and batch (the same
frames): max |score difference| and max |cam_logits difference| (also relative to max |cam_logits|).
`float32-highest` (jax only) is float32 with jax.default_matmul_precision("highest"): on an
Ampere-or-newer GPU plain float32 convolutions may run in TF32.

A configuration whose expected cost would pass --deadline (seconds since start; 0: none) is skipped
and listed as such, so the run ends in time. Progress goes to stderr, a Markdown table to stdout,
everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing inspectd
START = time.monotonic()
MODES = {"jax": ("jit", "eager", "predict"), "tensorflow": ("jit", "graph", "eager", "predict")}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def environment(backend: str) -> dict:
    """Device, versions, and what ONNX Runtime could use (recorded, not measured)."""
    import keras

    env = {
        "backend": backend,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "keras": keras.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }
    if backend == "jax":
        import jax
        import jaxlib

        env["jax"], env["jaxlib"] = jax.__version__, jaxlib.__version__
        devices = jax.devices()
        env["devices"] = [str(d) for d in devices]
        env["device_kind"] = devices[0].device_kind
        env["platform"] = "gpu" if devices[0].platform in ("gpu", "cuda", "rocm") else devices[0].platform
        env["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    elif backend == "tensorflow":
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        env["devices"] = [g.name for g in gpus] or ["CPU"]
        env["device_kind"] = tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else "CPU"
        env["platform"] = "gpu" if gpus else "cpu"
        env["tf32"] = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # not installed, or its import fails: only recorded, never needed
        env["onnxruntime_providers"] = None
    return env


@contextlib.contextmanager
def numpy_initial_values(seed: int = 0):
    """Under JAX, draw new variables' random initial values with numpy instead of jax.random.

    Keras creates every variable from its initializer, also when loading a file (whose weights then
    replace them), and jax.random compiles once per weight shape: 20-40 s of XLA compilations to load
    or build an EfficientNet. With numpy the values come from the same distributions (the
    initializers still compute their scales), and nothing compiles. Other backends: no change.
    """
    import keras

    if keras.backend.backend() != "jax":
        yield
        return
    import jax.numpy as jnp
    from keras.src.backend.jax import random as jax_random

    rng = np.random.default_rng(seed)

    def as_tensor(x, dtype):
        return jnp.asarray(x.astype(np.float32), dtype=dtype or keras.config.floatx())

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return as_tensor(rng.normal(mean, stddev, shape), dtype)

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return as_tensor(rng.uniform(minval, maxval, shape), dtype)

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        x = rng.standard_normal(shape)
        while (out := np.abs(x) > 2.0).any():  # jax.random.truncated_normal's bounds: +-2 standard deviations
            x[out] = rng.standard_normal(int(out.sum()))
        return as_tensor(x * stddev + mean, dtype)

    saved = jax_random.normal, jax_random.uniform, jax_random.truncated_normal
    jax_random.normal, jax_random.uniform, jax_random.truncated_normal = normal, uniform, truncated_normal
    try:
        yield
    finally:
        jax_random.normal, jax_random.uniform, jax_random.truncated_normal = saved


def build_v2b0(size: tuple[int, int], folder: Path) -> Path:
    """The seed paper's classifier (random weights) through `inspectd convert`: a deployable model file."""
    import keras

    from inspectd.toolkit.backbones import build_features
    from inspectd.toolkit.convert import convert

    w, h = size
    keras.utils.set_random_seed(0)
    features = build_features("efficientnetv2b0", 16, (w, h), "none")
    image = keras.Input((h, w, 3), name="image")
    x = keras.layers.Dropout(0.3)(keras.layers.GlobalAveragePooling2D()(features(image)))
    classifier = keras.Model(image, keras.layers.Dense(1, activation="sigmoid")(x), name="classifier_v2b0")
    classifier.save(folder / "classifier_v2b0.keras")
    return convert(folder / "classifier_v2b0.keras", folder / f"v2b0_{w}x{h}.keras")


def model_paths(names: list[str], v2b0_size: tuple[int, int], folder: Path) -> dict[str, Path]:
    paths = {}
    for name in names:
        if name == "demo":
            paths[name] = ROOT / "inspectd" / "assets" / "demo.keras"
        elif name == "v2b0":
            t0 = time.monotonic()
            with numpy_initial_values():
                paths[name] = build_v2b0(v2b0_size, folder)
            log(f"v2b0 {v2b0_size[0]}x{v2b0_size[1]}: built and converted in {time.monotonic() - t0:.1f} s")
        else:
            paths[Path(name).stem] = Path(name)
    return paths


def _jax_runner(model, mode: str, highest: bool):
    import jax
    import jax.numpy as jnp

    precision = jax.default_matmul_precision("highest") if highest else contextlib.nullcontext()
    if mode == "jit":
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(trainable, non_trainable, frames):
            out, _ = model.stateless_call(trainable, non_trainable, frames.astype(jnp.float32), training=False)
            return out["score"].astype(jnp.float32), out["cam_logits"].astype(jnp.float32)

        def run(frames):
            with precision:
                score, cam = forward(trainable, non_trainable, frames)  # numpy in: host -> device each call
            return np.asarray(score), np.asarray(cam)  # waits for the device, device -> host
    elif mode == "eager":

        def run(frames):
            with precision:
                out = model(jnp.asarray(frames).astype(jnp.float32), training=False)
            return np.asarray(out["score"], np.float32), np.asarray(out["cam_logits"], np.float32)
    else:

        def run(frames):
            with precision:
                out = model.predict_on_batch(frames.astype(np.float32))
            return np.asarray(out["score"], np.float32), np.asarray(out["cam_logits"], np.float32)

    return run


def _tf_runner(model, mode: str):
    import tensorflow as tf

    device = "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"

    def forward(frames):
        out = model(tf.cast(frames, tf.float32), training=False)
        return tf.cast(out["score"], tf.float32), tf.cast(out["cam_logits"], tf.float32)

    if mode == "predict":

        def run(frames):
            out = model.predict_on_batch(frames.astype(np.float32))
            return np.asarray(out["score"], np.float32), np.asarray(out["cam_logits"], np.float32)

        return run
    fn = {"jit": tf.function(forward, jit_compile=True), "graph": tf.function(forward), "eager": forward}[mode]

    def run(frames):
        with tf.device(device):
            score, cam = fn(tf.constant(frames))
        return score.numpy(), cam.numpy()

    return run


def make_runner(backend: str, model, mode: str, highest: bool = False):
    """frames uint8 [B, H, W, 3] on the host -> (score [B], cam_logits [B, h, w]) float32 on the host."""
    return _jax_runner(model, mode, highest) if backend == "jax" else _tf_runner(model, mode)


def with_precision(model, precision: str):
    """The model computing in `precision` (same weights); float32 variants are the model itself."""
    from inspectd.pipeline.engine import with_policy

    return model if precision.startswith("float32") else with_policy(model, precision)


def measure(run, frames: np.ndarray, seconds: float, min_iters: int, max_iters: int) -> dict:
    """First call (compile), two untimed warm-up calls, then timed calls for `seconds` (at least min_iters)."""
    t0 = time.perf_counter()
    outputs = run(frames)
    first = time.perf_counter() - t0
    for _ in range(2):
        run(frames)
    lat = []
    end = time.perf_counter() + seconds
    while (time.perf_counter() < end or len(lat) < min_iters) and len(lat) < max_iters:
        t0 = time.perf_counter()
        run(frames)
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1000
    return {
        "outputs": outputs,
        "warmup_s": round(first, 3),
        "iterations": len(lat),
        "seconds": round(float(lat_ms.sum()) / 1000, 3),
        "frames_per_s": round(len(frames) * len(lat) / (lat_ms.sum() / 1000), 2),
        "latency_p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
        "latency_p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
        "latency_mean_ms": round(float(lat_ms.mean()), 3),
    }


def difference(outputs, reference) -> dict:
    """Max abs differences from the reference outputs (None without one), and whether all outputs are finite."""
    score, cam = outputs
    finite = bool(np.isfinite(score).all() and np.isfinite(cam).all())
    if reference is None:
        return {"diff_score": None, "diff_cam": None, "diff_cam_rel": None, "finite": finite}
    ref_score, ref_cam = reference
    d_cam = float(np.max(np.abs(cam - ref_cam)))
    scale = float(np.max(np.abs(ref_cam)))
    return {
        "diff_score": float(np.max(np.abs(score - ref_score))),
        "diff_cam": d_cam,
        "diff_cam_rel": d_cam / scale if scale > 0 else None,
        "finite": finite,
    }


def plan(args, backend: str) -> list[tuple[str, str]]:
    """(precision, mode) in run order: every precision compiled first (the float32 reference leading), then
    the slower modes, so a deadline cuts the least informative rows."""
    modes = [m for m in args.modes if m in MODES[backend]]
    compiled = [(p, "jit") for p in args.precisions if "jit" in modes]
    return compiled + [(p, m) for m in modes if m != "jit" for p in args.precisions if p in args.eager_precisions]


def device_memory(backend: str) -> dict | None:
    """The accelerator's peak memory so far (jax; None elsewhere or on the CPU)."""
    if backend != "jax":
        return None
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats} or None


def bench_model(name: str, path: Path, args, backend: str, results: list, skipped: list) -> dict:
    from inspectd.model.deployable import load_model

    t0 = time.monotonic()
    with numpy_initial_values():
        deployable = load_model(path)
    load_s = time.monotonic() - t0
    w, h = deployable.input_size
    info = {
        "name": name,
        "path": str(path),
        "input": [w, h],
        "cam": [deployable.meta["cam"]["height"], deployable.meta["cam"]["width"]],
        "backbone": deployable.meta.get("backbone"),
        "pooling": str(deployable.pooling),
        "params": int(deployable.model.count_params()),
        "load_s": round(load_s, 2),
    }
    log(f"{name}: loaded {w}x{h} ({info['params']:,} parameters) in {load_s:.1f} s")
    frames_all = np.random.default_rng(0).integers(0, 256, (max(args.batches), h, w, 3), dtype=np.uint8)
    reference: dict[int, tuple] = {}  # batch -> float32 jit outputs
    cost: dict[str, float] = {}  # mode -> largest first call so far (the deadline's estimate)
    model, built = None, None
    for precision, mode in plan(args, backend):
        if built != precision:
            model, built = None, precision
            gc.collect()
            t0 = time.monotonic()
            try:
                with numpy_initial_values():  # a rebuilt model: new variables, then the weights copied in
                    model = with_precision(deployable.model, precision)
            except Exception as exc:  # a policy this Keras/backend cannot build: recorded, the run goes on
                skipped.append({"model": name, "precision": precision, "why": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"{name} {precision}: cannot build ({exc})")
                continue
            rebuild_s = time.monotonic() - t0
        if model is None:
            continue
        run = make_runner(backend, model, mode, highest=precision == "float32-highest")
        for batch in args.batches:
            key = {"model": name, "precision": precision, "mode": mode, "batch": batch}
            if args.deadline and time.monotonic() - START + args.seconds + cost.get(mode, 5.0) + 1.0 > args.deadline:
                skipped.append({**key, "why": f"deadline {args.deadline:g} s"})
                log(f"{name} {precision} {mode} b={batch}: skipped (deadline)")
                continue
            try:
                m = measure(run, frames_all[:batch], args.seconds, args.min_iters, args.max_iters)
            except Exception as exc:  # e.g. out of memory at the largest batch: recorded, the run goes on
                skipped.append({**key, "why": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"{name} {precision} {mode} b={batch}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            cost[mode] = max(cost.get(mode, 0.0), m["warmup_s"])
            outputs = m.pop("outputs")
            if precision == "float32" and mode == "jit":
                reference[batch] = outputs
            row = {**key, **m, **difference(outputs, reference.get(batch)), "rebuild_s": round(rebuild_s, 2)}
            results.append(row)
            log(
                f"{name} {precision} {mode} b={batch}: {row['frames_per_s']:.1f} frames/s, p50 "
                f"{row['latency_p50_ms']:.2f} ms, first call {row['warmup_s']:.1f} s, "
                f"diff score {_fmt(row['diff_score'])} cam {_fmt(row['diff_cam'])}"
            )
    info["memory"] = device_memory(backend)
    return info


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def table(results: list) -> str:
    lines = [
        "| model | precision | mode | batch | frames/s | latency p50 / p99 (ms) | first call (s) | "
        "max abs diff score | max abs diff cam_logits (relative) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = "" if r["diff_cam_rel"] is None else f" ({r['diff_cam_rel']:.1e})"
        finite = "" if r["finite"] else " NON-FINITE"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['mode']} | {r['batch']} | {r['frames_per_s']:.1f} | "
            f"{r['latency_p50_ms']:.2f} / {r['latency_p99_ms']:.2f} | {r['warmup_s']:.1f} | "
            f"{_fmt(r['diff_score'])} | {_fmt(r['diff_cam'])}{rel}{finite} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu.json")
    ap.add_argument("--models", nargs="+", default=["demo", "v2b0"], help="demo, v2b0 or paths of deployable .keras files")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "mixed_float16", "mixed_bfloat16"],
        help="float32, float32-highest (jax), mixed_float16, mixed_bfloat16, float16, bfloat16",
    )
    ap.add_argument("--modes", nargs="+", default=["jit", "eager"], help="jit, graph (tensorflow), eager, predict")
    ap.add_argument(
        "--eager-precisions",
        nargs="+",
        default=["float32"],
        help="the precisions the non-jit modes run at (each first call compiles op by op)",
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration")
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--max-iters", type=int, default=5000)
    ap.add_argument("--v2b0-size", type=parse_size, default=(752, 480), help="WxH of the v2b0 model")
    ap.add_argument("--deadline", type=float, default=240, help="skip what would end later than this (s); 0: none")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when the backend sees no GPU (else exit 3)")
    args = ap.parse_args()
    args.batches = sorted(set(args.batches))
    args.precisions = sorted(dict.fromkeys(args.precisions), key=lambda p: p != "float32")  # the reference first

    import keras

    backend = keras.backend.backend()
    if backend not in MODES:
        ap.error(f"KERAS_BACKEND={backend}: this benchmark runs jax or tensorflow")
    env = environment(backend)
    log(
        f"keras {env['keras']} on {backend}: {env['devices']} ({env['device_kind']}); "
        f"onnxruntime providers {env['onnxruntime_providers']}"
    )
    if not args.allow_cpu and env["platform"] != "gpu":
        log(f"no GPU visible to {backend}: {env['devices']} (--allow-cpu to run on the CPU)")
        return 3
    results: list[dict] = []
    skipped: list[dict] = []
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_paths(args.models, args.v2b0_size, Path(tmp)).items():
            models.append(bench_model(name, path, args, backend, results, skipped))
            gc.collect()
    report = {
        "command": " ".join([f"KERAS_BACKEND={backend}", "python", *sys.argv]),
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": models,
        "results": results,
        "skipped": skipped,
        "total_seconds": round(time.monotonic() - START, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"command: `{report['command']}`; {env['device_kind']} ({backend}, keras {env['keras']}"
        f"{', jax ' + env['jax'] if 'jax' in env else ''}); frames: uint8 host -> device -> score and cam_logits "
        f"on the host; diff: vs float32 jit, same frames\n"
    )
    for m in models:
        print(
            f"- {m['name']}: {m['input'][0]}x{m['input'][1]} -> cam {m['cam'][1]}x{m['cam'][0]}, {m['backbone']}, "
            f"{m['params']:,} parameters"
            + (
                f", device memory peak so far {m['memory']['peak_bytes_in_use'] / 2**30:.2f} GiB"
                if m.get("memory") and "peak_bytes_in_use" in m["memory"]
                else ""
            )
        )
    print()
    print(table(results))
    if skipped:
        print(
            "\nskipped: "
            + "; ".join(
                f"{s.get('model')} {s.get('precision')} {s.get('mode', '')} b={s.get('batch', '-')} ({s['why']})" for s in skipped
            )
        )
    print(f"\ntotal {report['total_seconds']} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
