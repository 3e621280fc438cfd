"""One command, one run: the reference loop, the bare model per runtime and batch size, and the full daemon
with synthetic and with RTSP cameras; one JSON, one Markdown table, one PNG plot, ratios last.

    .venv/bin/python benchmarks/performance.py [--model builtin:demo] [--size 320x240] [--seconds 15]
        [--batches 1,4] [--runtimes tensorflow,onnxruntime,openvino] [--cameras 4] [--offered 1.2]
        [--pipeline-runtime R] [--profile] [--out benchmarks/results/performance]  # -> .json, .md, .png

Every measurement runs in a process of its own (this script with --child), so CPU % and peak RSS are
that measurement's alone:
- reference: the reference notebook's loop, `model.predict` on one frame at a time (resized first);
- bare RUNTIME bB: `InferenceEngine.infer` on B frames already in memory at the camera size, full
  batches, after warm-up: preprocess + forward with that runtime, the ceiling of the pipeline;
- pipeline synthetic / rtsp: `inspectd run` with --cameras cameras (synthetic://, or H.264 over RTSP
  from GStreamer's RTSP server on 127.0.0.1, decoded by the daemon) offering together --offered x the
  best bare frames/s at the batch size the config uses (1: `max_batch = "auto"` on a CPU), so the model
  is always busy and frames are dropped, counted, as a line would when cameras outrun it. The daemon
  runs the runtime that measured fastest at batch 1 in this run (`--pipeline-runtime` to choose).
  Frames/s, capture-to-publish p50/p99 (histogram_quantile-style, from the
  daemon's inspectd_end_to_end_seconds), CPU % (of one core) and peak RSS (sampled /metrics), and the
  frame accounts the daemon logs at shutdown (residual 0 = every frame accounted for). The RTSP
  servers (x264) run as separate processes on the same cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the test suite's RTSP server and /metrics parser


# -- children: one measurement each, JSON on stdout ---------------------------------------------------------
def _frames(n: int, width: int, height: int) -> list[np.ndarray]:
    from inspectd.synth import render

    rng = np.random.default_rng(0)
    return [np.repeat(render(rng, width, height, defect=i % 2 == 0).image[..., None], 3, axis=2) for i in range(n)]


def _timed(call, seconds: float, per_call: int) -> dict:
    call()  # warm
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"fps": round(per_call * len(lat) / wall, 2), "batch_p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
            "batch_p99_ms": round(1000 * float(np.percentile(lat, 99)), 2), "calls": len(lat)}


def child_reference(args) -> dict:
    """The reference notebook's way: resize, then `model.predict` on a batch of one, frame after frame."""
    from inspectd.model.deployable import load_model
    from inspectd.pipeline.engine import preprocess
    from inspectd.service.config import resolve_model_path
    from inspectd.tfload import import_tensorflow

    import_tensorflow()
    deployable = load_model(resolve_model_path(args.model))
    w, h = deployable.input_size
    frames = _frames(8, args.width, args.height)
    state = {"i": 0}

    def one():
        frame = frames[state["i"] % len(frames)]
        state["i"] += 1
        deployable.model.predict(preprocess(frame[None], (h, w)).numpy(), verbose=0)

    t0, c0 = time.monotonic(), time.process_time()
    out = _timed(one, args.seconds, 1)
    out["cpu_percent"] = round(100 * (time.process_time() - c0) / (time.monotonic() - t0), 1)
    return out


def child_bare(args) -> dict:
    from inspectd.model.deployable import load_model
    from inspectd.pipeline.engine import InferenceEngine
    from inspectd.service.config import resolve_model_path
    from inspectd.tfload import import_tensorflow

    import_tensorflow()
    engine = InferenceEngine(load_model(resolve_model_path(args.model)), (args.batch,), "cpu", runtime=args.runtime)
    engine.warmup((args.width, args.height))
    frames = _frames(args.batch, args.width, args.height)
    traces = engine.traces()
    t0, c0 = time.monotonic(), time.process_time()
    out = _timed(lambda: engine.infer(frames), args.seconds, args.batch)
    out["cpu_percent"] = round(100 * (time.process_time() - c0) / (time.monotonic() - t0), 1)
    out["retraced"] = engine.traces() - traces
    out["runtime"] = engine.runtime
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# -- the daemon, as a user runs it -----------------------------------------------------------------------
def _free_port() -> int:
    from support import free_port

    return free_port()


def _config(urls: list[str], model: str, runtime: str, batch: int, metrics_port: int, publish_port: int) -> str:
    cams = "\n".join(f'[[cameras]]\nid = "cam{i}"\nurl = "{url}"\n' for i, url in enumerate(urls))
    return (f'[model]\npath = "{model}"\nruntime = "{runtime}"\n[batching]\nmax_batch = {batch}\nmax_wait_ms = 10\n'
            f'[publish]\nendpoint = "tcp://127.0.0.1:{publish_port}"\n[metrics]\nhost = "127.0.0.1"\n'
            f'port = {metrics_port}\n{cams}')


def _quantile(m, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile over all label sets: linear within the bucket holding the quantile."""
    buckets: dict[float, float] = {}
    for s in m.find(f"{name}_bucket"):
        le = float(s.labels["le"])
        buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    total, lower, below = buckets[bounds[-1]], 0.0, 0.0
    for b in bounds:
        if buckets[b] >= q * total:
            if math.isinf(b):
                return lower
            share = (q * total - below) / max(buckets[b] - below, 1e-12)
            return round(lower + (b - lower) * share, 4)
        lower, below = b, buckets[b]
    return None


def _delta_histogram(m1, m0, name: str):
    """A /metrics view whose histogram `name` holds only the observations between two scrapes."""
    from support import MetricSample

    class View:
        def find(self, metric: str):
            before = {tuple(sorted(s.labels.items())): s.value for s in m0.find(metric)}
            return [MetricSample(s.name, s.labels, s.value - before.get(tuple(sorted(s.labels.items())), 0.0))
                    for s in m1.find(metric)]

    return View()


def _sum(m, name: str, **labels) -> float:
    return sum(s.value for s in m.find(name, **labels))


def run_pipeline(args, urls: list[str], label: str) -> dict:
    from support import scrape

    metrics_port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(_config(urls, args.model, args.pipeline_runtime, 1, metrics_port, _free_port()))
        log = open(Path(tmp) / "daemon.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            deadline = time.monotonic() + 180
            while True:  # ready, and every camera's frames inferred: the measurement starts warm
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"{label}: the daemon did not get going:\n{log.read()[-3000:]}")
                try:
                    m = scrape(url)
                    if all((m.value("inspectd_frames_inferred_total", camera=f"cam{i}") or 0) > 0
                           for i in range(len(urls))):
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            time.sleep(2.0)
            spy = _profiler(proc.pid, args, label)
            m0, t0 = scrape(url), time.monotonic()
            rss = []
            while time.monotonic() - t0 < args.seconds:
                time.sleep(0.5)
                rss.append(scrape(url).value("process_resident_memory_bytes") or 0)
            m1, t1 = scrape(url), time.monotonic()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        log.seek(0)
        text = log.read()
    profile = _profile_summary(spy) if spy else None
    wall = t1 - t0
    window = _delta_histogram(m1, m0, "inspectd_end_to_end_seconds")
    inferred = _sum(m1, "inspectd_frames_inferred_total") - _sum(m0, "inspectd_frames_inferred_total")
    captured = _sum(m1, "inspectd_frames_captured_total") - _sum(m0, "inspectd_frames_captured_total")
    dropped = _sum(m1, "inspectd_frames_dropped_total") - _sum(m0, "inspectd_frames_dropped_total")
    batches = m1.value("inspectd_inference_seconds_count") - m0.value("inspectd_inference_seconds_count")
    infer_s = m1.value("inspectd_inference_seconds_sum") - m0.value("inspectd_inference_seconds_sum")
    residuals = [int(r) for r in re.findall(r"residual (-?\d+)", text)]
    runtime = re.search(r"with (\w+), events on", text)
    return {
        "fps": round(inferred / wall, 2), "offered_fps": round(captured / wall, 2),
        "dropped_fps": round(dropped / wall, 2), "cameras": len(urls),
        "end_to_end_p50_s": _quantile(window, "inspectd_end_to_end_seconds", 0.5),
        "end_to_end_p99_s": _quantile(window, "inspectd_end_to_end_seconds", 0.99),
        "inference_mean_ms": round(1000 * infer_s / batches, 2) if batches else None,
        "cpu_percent": round(100 * (m1.value("process_cpu_seconds_total") - m0.value("process_cpu_seconds_total"))
                             / wall, 1),
        "peak_rss_mb": round(max(rss) / 2**20, 1) if rss else None,
        "residual": sum(abs(r) for r in residuals) if residuals else None, "accounts": len(residuals),
        "exit": code, "runtime": runtime.group(1) if runtime else None, "profile": profile,
    }


def _profiler(pid: int, args, label: str):
    """py-spy sampling the daemon for the measuring window (--profile): (process, collapsed-stacks file)."""
    if not args.profile:
        return None
    out = Path(tempfile.mkdtemp()) / f"{label.replace(' ', '-')}.txt"
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", "50", "--threads",
           "--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def _thread_group(name: str) -> str:
    """py-spy's thread label -> the pipeline stage (capture:cam0 -> capture)."""
    for stage in ("capture", "infer", "postprocess", "publish", "batch", "MainThread", "metrics", "archive"):
        if stage.lower() in name.lower():
            return stage
    return "other"


def _profile_summary(spy) -> dict:
    """CPU samples per stage (thread) and the functions that took the most, from py-spy's collapsed stacks
    (each line: frames separated by ';', then the sample count; --threads puts the thread first)."""
    proc, path = spy
    proc.wait(60)
    if not path.is_file():
        return {"error": (proc.stderr.read() or "")[-300:]}
    by_stage: dict[str, int] = {}
    by_function: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        stage = _thread_group(frames[0])
        by_stage[stage] = by_stage.get(stage, 0) + n
        leaf = re.sub(r"\s*\(.*", "", frames[-1]).strip()
        key = f"{stage}: {leaf}"
        by_function[key] = by_function.get(key, 0) + n
    share = lambda n: round(100 * n / max(total, 1), 1)  # noqa: E731
    return {"samples": total, "stages_percent": {k: share(v) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])},
            "top_functions_percent": {k: share(v) for k, v in sorted(by_function.items(), key=lambda kv: -kv[1])[:15]}}


def pipeline_synthetic(args, camera_fps: float) -> dict:
    # repeat=8: frames rendered once and cycled (rendering costs about 5 ms a 320x240 frame, as much as inference)
    url = f"synthetic://?fps={camera_fps:.1f}&width={args.width}&height={args.height}&defect_rate=0.3&repeat=8&seed="
    return run_pipeline(args, [url + str(i) for i in range(args.cameras)], "pipeline synthetic")


def pipeline_rtsp(args, camera_fps: float) -> dict:
    from rtsp import RtspServer

    servers = [RtspServer(mode="synthetic", width=args.width, height=args.height, fps=math.ceil(camera_fps), seed=i)
               for i in range(args.cameras)]
    try:
        for s in servers:
            s.start()
        return run_pipeline(args, [s.url for s in servers], "pipeline rtsp")
    finally:
        for s in servers:
            s.stop()


# -- the run ---------------------------------------------------------------------------------------------
def child(args, kind: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--size", f"{args.width}x{args.height}",
           "--seconds", str(args.seconds)] + [f"--{k}={v}" for k, v in extra.items()]
    print(f"  {kind} {extra or ''} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {extra}: failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("inspectd", "tensorflow", "keras", "onnxruntime", "openvino", "tf2onnx", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPU cores ({model}), no GPU used"


def measure(args) -> dict:
    res = {"command": " ".join(["benchmarks/performance.py", *sys.argv[1:]]), "machine": _machine(),
           "versions": _versions(), "options": {k: v for k, v in vars(args).items() if k != "child"},
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print("reference loop", file=sys.stderr)
    res["reference"] = child(args, "reference")
    res["bare"] = []
    for runtime in args.runtimes:
        for batch in args.batches:
            row = child(args, "bare", runtime=runtime, batch=batch)
            res["bare"].append({"runtime": runtime, "batch": batch, **row})
    best = max((r for r in res["bare"] if r["batch"] == 1), key=lambda r: r["fps"])
    res["best_bare_batch1"] = {"runtime": best["runtime"], "fps": best["fps"], "batch_p50_ms": best["batch_p50_ms"]}
    args.pipeline_runtime = args.pipeline_runtime or best["runtime"]
    same = next(r for r in res["bare"] if r["batch"] == 1 and r["runtime"] == args.pipeline_runtime)
    camera_fps = args.offered * same["fps"] / args.cameras
    res["camera_fps"] = round(camera_fps, 1)
    print(f"pipelines: {args.cameras} cameras x {camera_fps:.1f} frames/s (best bare at batch 1: {best['runtime']} "
          f"{best['fps']} frames/s)", file=sys.stderr)
    res["pipeline_synthetic"] = pipeline_synthetic(args, camera_fps)
    res["pipeline_rtsp"] = pipeline_rtsp(args, camera_fps)
    bound = 2 * same["batch_p50_ms"] / 1000 + 0.010
    res["ratios"] = {
        "synthetic_vs_best_bare": round(res["pipeline_synthetic"]["fps"] / best["fps"], 3),
        "rtsp_vs_best_bare": round(res["pipeline_rtsp"]["fps"] / best["fps"], 3),
        "synthetic_vs_same_runtime_bare": round(res["pipeline_synthetic"]["fps"] / same["fps"], 3),
        "rtsp_vs_same_runtime_bare": round(res["pipeline_rtsp"]["fps"] / same["fps"], 3),
        "synthetic_vs_reference": round(res["pipeline_synthetic"]["fps"] / res["reference"]["fps"], 2),
        "best_bare_vs_tensorflow_b1": round(best["fps"] / next(r["fps"] for r in res["bare"]
                                                                 if r["runtime"] == "tensorflow" and r["batch"] == 1), 2),
        "p99_bound_s": round(bound, 4),
    }
    return res


def markdown(res: dict) -> str:
    o = res["options"]
    lines = [f"`{res['command']}` — {res['machine']}; model {o['model_label']}, camera frames {o['width']}x{o['height']}; "
             f"{res['started']}", "",
             "| measurement | runtime | batch | frames/s | batch p50 / p99 ms | capture-to-publish p50 / p99 s | "
             "CPU % | peak RSS MB | residual |", "|---|---|---|---|---|---|---|---|---|"]
    ref = res["reference"]
    lines.append(f"| reference loop (`model.predict` per frame) | tensorflow | 1 | {ref['fps']} | {ref['batch_p50_ms']} / "
                 f"{ref['batch_p99_ms']} | - | {ref['cpu_percent']} | - | - |")
    for r in res["bare"]:
        lines.append(f"| bare model | {r['runtime']} | {r['batch']} | {r['fps']} | {r['batch_p50_ms']} / "
                     f"{r['batch_p99_ms']} | - | {r['cpu_percent']} | {r['peak_rss_mb']} | - |")
    for key, name in (("pipeline_synthetic", "pipeline, synthetic cameras"), ("pipeline_rtsp", "pipeline, RTSP cameras")):
        p = res[key]
        lines.append(f"| {name} ({p['cameras']} x {res['camera_fps']} frames/s offered) | {p['runtime']} | 1 | "
                     f"{p['fps']} | {p['inference_mean_ms']} (mean) | {p['end_to_end_p50_s']} / {p['end_to_end_p99_s']} "
                     f"| {p['cpu_percent']} | {p['peak_rss_mb']} | {p['residual']} |")
    r = res["ratios"]
    syn, rtsp = res["pipeline_synthetic"], res["pipeline_rtsp"]
    ok = lambda cond: "met" if cond else "**not met**"  # noqa: E731
    lines += ["", f"Ratios: pipeline/best bare {r['synthetic_vs_best_bare']} (synthetic), {r['rtsp_vs_best_bare']} (RTSP); "
              f"pipeline/bare of its own runtime ({syn['runtime']}) {r['synthetic_vs_same_runtime_bare']} (synthetic), "
              f"{r['rtsp_vs_same_runtime_bare']} (RTSP); pipeline/reference loop {r['synthetic_vs_reference']}; "
              f"best runtime/TensorFlow at batch 1 {r['best_bare_vs_tensorflow_b1']}.", "",
              "| target | measured | |", "|---|---|---|",
              f"| synthetic pipeline >= 0.90 x best bare | {r['synthetic_vs_best_bare']} | "
              f"{ok(r['synthetic_vs_best_bare'] >= 0.9)} |",
              f"| RTSP pipeline >= 0.80 x best bare | {r['rtsp_vs_best_bare']} | {ok(r['rtsp_vs_best_bare'] >= 0.8)} |",
              f"| pipeline >= 3 x reference loop | {r['synthetic_vs_reference']} | {ok(r['synthetic_vs_reference'] >= 3)} |",
              f"| p99 capture-to-publish <= 2 x batch p50 + max_wait = {r['p99_bound_s']} s | {syn['end_to_end_p99_s']} "
              f"(synthetic), {rtsp['end_to_end_p99_s']} (RTSP) | "
              f"{ok(max(syn['end_to_end_p99_s'] or 9, rtsp['end_to_end_p99_s'] or 9) <= r['p99_bound_s'])} |",
              f"| accounting residual 0 | {syn['residual']}, {rtsp['residual']} | "
              f"{ok(syn['residual'] == rtsp['residual'] == 0)} |"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["reference"] + [f"{r['runtime']} b{r['batch']}" for r in res["bare"]] + ["pipeline synthetic",
                                                                                       "pipeline RTSP"]
    fps = [res["reference"]["fps"]] + [r["fps"] for r in res["bare"]] + [res["pipeline_synthetic"]["fps"],
                                                                          res["pipeline_rtsp"]["fps"]]
    colors = ["grey"] + ["tab:blue"] * len(res["bare"]) + ["tab:green", "tab:olive"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh(names[::-1], fps[::-1], color=colors[::-1])
    for i, v in enumerate(fps[::-1]):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.axvline(res["best_bare_batch1"]["fps"], color="k", ls=":", lw=1, label="best bare model, batch 1")
    ax.set_xlabel("frames/s")
    ax.set_title(f"{res['options']['model_label']}, {res['options']['width']}x{res['options']['height']} frames, "
                 f"{res['machine'].split(' (')[0]}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:demo")
    ap.add_argument("--size", default="320x240", help="camera frames WxH")
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring time of each measurement")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runtimes", default="tensorflow,onnxruntime,openvino")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--offered", type=float, default=1.2, help="cameras offer this x the best bare frames/s")
    ap.add_argument("--pipeline-runtime", help="the daemon's runtime (default: the fastest bare at batch 1 in this run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/performance")
    ap.add_argument("--profile", action="store_true", help="sample the pipelines with py-spy (pip install py-spy): "
                    "CPU share per stage and the top functions, in the JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    args.model_label = args.model  # as given, for the results
    if not args.model.startswith("builtin:"):  # the daemon's config lives in a temporary folder
        args.model = str(Path(args.model).resolve())
    if args.child:
        print(json.dumps({"reference": child_reference, "bare": child_bare}[args.child](args)))
        return
    args.batches = [int(b) for b in args.batches.split(",")]
    args.runtimes = args.runtimes.split(",")
    res = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
