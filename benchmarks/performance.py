"""One command, one run: the reference loop, the bare model per runtime and batch size, and the full daemon
with synthetic and with RTSP cameras; one JSON, one Markdown table, one PNG plot, ratios last.

    .venv/bin/python benchmarks/performance.py [--model builtin:demo] [--size 320x240] [--seconds 15]
        [--batches 1,4] [--runtimes tensorflow,onnxruntime,openvino] [--cameras 4] [--offered 1.2]
        [--pipeline-runtime R] [--pipeline-batch 1] [--repeat 3] [--profile]
        [--precisions float32,bfloat16,int8 [--calibration DIR] [--validation DATASET]]
        [--out benchmarks/results/performance]  # -> .json, .md, .png (and OUT-cache/: conversions, gates, INT8)

Every measurement runs in a process of its own (this script with --child), so CPU % and peak RSS are
that measurement's alone:
- reference: the reference notebook's loop, `model.predict` on one frame at a time (resized first);
- bare RUNTIME bB: `InferenceEngine.infer` on B frames already in memory at the camera size, full
  batches, after warm-up: preprocess + forward with that runtime, the ceiling of the pipeline;
- pipeline synthetic / rtsp: `inspectd run` with --cameras cameras (synthetic://, or H.264 over RTSP
  from GStreamer's RTSP server on 127.0.0.1, decoded by the daemon) offering together --offered x the
  bare frames/s at --pipeline-batch (the config's max_batch; 1 is what `"auto"` takes on a CPU), so the
  model is always busy and frames are dropped, counted, as a line would when cameras outrun it. The
  daemon runs the runtime that measured fastest at that batch in this run (`--pipeline-runtime` to choose).
  Frames/s, capture-to-publish p50/p99 (histogram_quantile-style, from the
  daemon's inspectd_end_to_end_seconds), CPU % (of one core) and peak RSS (the kernel's VmHWM), and the
  frame accounts the daemon logs at shutdown (residual 0 = every frame accounted for). The RTSP
  servers (x264) run as separate processes on the same cores. Nothing samples the daemon during the
  window (a scrape at each end); --profile runs py-spy in a second window of the same length after it,
  in the first round.
- --repeat rounds of (bare model at the pipeline's runtime and batch, pipeline synthetic, pipeline RTSP),
  interleaved: the ratios are the rounds' median, each round's pipeline over its own bare measurement.
- --precisions beyond float32: first each one's quality gate, `inspectd export MODEL --runtime R --precision P`
  (`--int8`: calibrated on --calibration, default the model's training split) for every runtime but TensorFlow
  that runs it, on --validation (default the training run's validation split; for builtin:demo both default to
  synthetic sets of two seeds it was not trained on), into OUT-cache/; then the bare model at each precision that
  passed, per runtime and batch size, beside float32 (ratios in the gates table). A precision this CPU lacks
  (bfloat16 without AVX-512 BF16 or AMX) is a row saying so.
- CPU per thread (bare and pipelines): every thread's CPU time and involuntary context switches from
  /proc over the window, Python threads named through `py-spy dump`, native ones (the runtimes' pools,
  TensorFlow's, GStreamer's) by their OS name. --profile adds py-spy's samples of the Python threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
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


def _thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """Every thread of `pid`, Python's and native: tid -> (comm, CPU clock ticks, involuntary context switches)
    from /proc (read by hand: a dozen lines; py-spy sees only Python threads, and psutil is not a dependency)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:  # the thread ended between listing and reading
            continue
        fields = stat.rpartition(")")[2].split()  # after "(comm)": state is field 3, utime/stime 14/15
        nvcsw = int(re.search(r"nonvoluntary_ctxt_switches:\s*(\d+)", status).group(1))
        out[int(task.name)] = (stat[stat.index("(") + 1 : stat.rindex(")")], int(fields[11]) + int(fields[12]), nvcsw)
    return out


def _py_spy() -> str:
    """py-spy's executable: on the PATH, else beside this interpreter (a venv's bin/)."""
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def _python_thread_names(pid: int, dumps: int = 3) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (it prints native tids); {} without py-spy. A non-blocking
    dump can miss a thread caught mid-update (measured: 1 of 9 named threads in 2 of 3 rounds), so the names
    of several dumps are merged."""
    exe = _py_spy()
    names: dict[int, str] = {}
    for _ in range(dumps):
        try:
            done = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"  py-spy dump: {e}", file=sys.stderr)
            return names
        names.update({int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]+)"', done.stdout, re.M)})
    if not names:
        print(f"  py-spy dump: {(done.stderr or done.stdout).strip()[-200:]}", file=sys.stderr)
    return names


class ThreadCpu:
    """CPU per thread over a window, Python threads by name and native ones (the runtimes' pools, TensorFlow's,
    GStreamer's) by the name the OS has for them: where the cores went, which py-spy alone cannot say."""

    def __init__(self, pid: int, names: bool = True):
        self.pid, self.names = pid, _python_thread_names(pid) if names else {}
        self.t0, self.before = time.monotonic(), _thread_ticks(pid)

    def summary(self) -> dict:
        after, wall, hz = _thread_ticks(self.pid), time.monotonic() - self.t0, os.sysconf("SC_CLK_TCK")
        groups: dict[str, list[float]] = {}
        for tid, (comm, ticks, nvcsw) in after.items():
            _, ticks0, nvcsw0 = self.before.get(tid, (comm, 0, 0))
            name = self.names.get(tid)
            group = _thread_group(name) if name else f"native: {comm}"
            g = groups.setdefault(group, [0.0, 0.0, 0])
            g[0] += 100 * (ticks - ticks0) / hz / wall
            g[1] += (nvcsw - nvcsw0) / wall
            g[2] += 1
        return {
            k: {"cpu_percent": round(v[0], 1), "preempted_per_s": round(v[1], 1), "threads": v[2]}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])
            if v[0] >= 0.5 or v[1] >= 1
        }


def _timed(call, seconds: float, per_call: int) -> dict:
    call()  # warm
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {
        "fps": round(per_call * len(lat) / wall, 2),
        "batch_p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
        "batch_p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        "calls": len(lat),
    }


def child_reference(args) -> dict:
    """The reference notebook's way: resize, then `model.predict` on a batch of one, frame after frame."""
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline.engine import preprocess
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
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline.engine import InferenceEngine
    from inspectd.tfload import import_tensorflow

    import_tensorflow()
    engine = InferenceEngine(
        load_model(resolve_model_path(args.model)),
        (args.batch,),
        args.device,
        precision=args.precision,
        xla=args.xla,
        runtime=args.runtime,
        cache_dir=args.cache_dir,  # the INT8 models of the gates step
        gated=False,  # speed only: a precision's quality is the gate's to measure (inspectd export --precision)
    )
    engine.warmup((args.width, args.height))
    frames = _frames(args.batch, args.width, args.height)
    traces = engine.traces()
    engine.infer(frames)
    threads = ThreadCpu(os.getpid())
    t0, c0 = time.monotonic(), time.process_time()
    out = _timed(lambda: engine.infer(frames), args.seconds, args.batch)
    out["threads"] = threads.summary()
    out["cpu_percent"] = round(100 * (time.process_time() - c0) / (time.monotonic() - t0), 1)
    out["retraced"] = engine.traces() - traces
    out["runtime"] = engine.runtime
    out["precision"] = args.precision
    out["peak_rss_mb"] = _peak_rss_mb(os.getpid())
    return out


# -- the daemon, as a user runs it -----------------------------------------------------------------------
def _free_port() -> int:
    from support import free_port

    return free_port()


def _config(urls: list[str], args, metrics_port: int, publish_port: int) -> str:
    cams = "\n".join(f'[[cameras]]\nid = "cam{i}"\nurl = "{url}"\n' for i, url in enumerate(urls))
    return (
        f'[model]\npath = "{args.model}"\nruntime = "{args.pipeline_runtime}"\ndevice = "{args.device}"\n'
        f'precision = "{args.precision}"\nxla = {str(args.xla).lower()}\ncache_dir = "{args.cache_dir}"\n'
        f"[batching]\nmax_batch = {args.pipeline_batch}\nmax_wait_ms = 10\n"
        f'[publish]\nendpoint = "tcp://127.0.0.1:{publish_port}"\n[metrics]\nhost = "127.0.0.1"\n'
        f"port = {metrics_port}\n{cams}"
    )


def _quantile(m, name: str, q: float) -> float | None:
    from inspectd.bench import histogram_quantile

    return histogram_quantile([(float(s.labels["le"]), s.value) for s in m.find(f"{name}_bucket")], q)


def _delta_histogram(m1, m0, name: str):
    """A /metrics view whose histogram `name` holds only the observations between two scrapes."""
    from support import MetricSample

    class View:
        def find(self, metric: str):
            before = {tuple(sorted(s.labels.items())): s.value for s in m0.find(metric)}
            return [
                MetricSample(s.name, s.labels, s.value - before.get(tuple(sorted(s.labels.items())), 0.0))
                for s in m1.find(metric)
            ]

    return View()


def _sum(m, name: str, **labels) -> float:
    return sum(s.value for s in m.find(name, **labels))


def run_pipeline(args, urls: list[str], label: str, servers: tuple[int, ...] = (), profile: bool = False) -> dict:
    """`inspectd run` on `urls`; `servers`: pids of the cameras' processes, whose CPU is counted beside it."""
    from support import scrape

    metrics_port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(_config(urls, args, metrics_port, _free_port()))
        log = open(Path(tmp) / "daemon.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            deadline = time.monotonic() + 180
            while True:  # ready, and every camera's frames inferred: the measurement starts warm
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"{label}: the daemon did not get going:\n{log.read()[-3000:]}")
                try:
                    m = scrape(url)
                    if all((m.value("inspectd_frames_inferred_total", camera=f"cam{i}") or 0) > 0 for i in range(len(urls))):
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            time.sleep(2.0)
            # The window is left alone: two scrapes and /proc reads at its ends (peak RSS is the kernel's
            # VmHWM), nothing sampling the daemon meanwhile; py-spy (--profile) runs in a second window after it.
            side = [ThreadCpu(pid, names=False) for pid in servers]  # (their threads' names are not needed)
            threads = ThreadCpu(proc.pid)
            m0, t0 = scrape(url), time.monotonic()
            time.sleep(args.seconds)
            m1, t1 = scrape(url), time.monotonic()
            thread_cpu = threads.summary()
            peak_rss = _peak_rss_mb(proc.pid)
            if side:
                groups = [g for s in side for g in s.summary().values()]
                thread_cpu["other processes: RTSP servers (x264)"] = {
                    k: round(sum(g[k] for g in groups), 1) for k in ("cpu_percent", "preempted_per_s", "threads")
                }
            spy = _profiler(proc.pid, args, label) if profile else None
            if spy:
                try:
                    spy[0].wait(args.seconds + 60)
                except subprocess.TimeoutExpired:
                    spy[0].kill()
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
    batches = m1.value("inspectd_inference_seconds_count", model="default") - m0.value(
        "inspectd_inference_seconds_count", model="default"
    )
    infer_s = m1.value("inspectd_inference_seconds_sum", model="default") - m0.value(
        "inspectd_inference_seconds_sum", model="default"
    )
    residuals = [int(r) for r in re.findall(r"residual (-?\d+)", text)]
    runtime = re.search(r"with (\w+), events on", text)
    return {
        "fps": round(inferred / wall, 2),
        "offered_fps": round(captured / wall, 2),
        "dropped_fps": round(dropped / wall, 2),
        "cameras": len(urls),
        "end_to_end_p50_s": _quantile(window, "inspectd_end_to_end_seconds", 0.5),
        "end_to_end_p99_s": _quantile(window, "inspectd_end_to_end_seconds", 0.99),
        "inference_mean_ms": round(1000 * infer_s / batches, 2) if batches else None,
        "cpu_percent": round(100 * (m1.value("process_cpu_seconds_total") - m0.value("process_cpu_seconds_total")) / wall, 1),
        "peak_rss_mb": peak_rss,
        "residual": sum(abs(r) for r in residuals) if residuals else None,
        "accounts": len(residuals),
        "exit": code,
        "runtime": runtime.group(1) if runtime else None,
        "profile": profile,
        "threads": thread_cpu,
    }


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM), in MB."""
    m = re.search(r"VmHWM:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(m.group(1)) / 1024, 1) if m else None


def _profiler(pid: int, args, label: str):
    """py-spy sampling the daemon for --seconds (--profile): (process, collapsed-stacks file)."""
    if not args.profile:
        return None
    out = Path(tempfile.mkdtemp()) / f"{label.replace(' ', '-')}.txt"
    cmd = [
        _py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(args.seconds)),
        "--rate",
        "50",
        "--threads",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
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
    return {
        "samples": total,
        "stages_percent": {k: share(v) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])},
        "top_functions_percent": {k: share(v) for k, v in sorted(by_function.items(), key=lambda kv: -kv[1])[:15]},
    }


def pipeline_synthetic(args, camera_fps: float, profile: bool = False) -> dict:
    # repeat=8: frames rendered once and cycled (rendering costs about 5 ms a 320x240 frame, as much as inference)
    url = f"synthetic://?fps={camera_fps:.1f}&width={args.width}&height={args.height}&defect_rate=0.3&repeat=8&seed="
    return run_pipeline(args, [url + str(i) for i in range(args.cameras)], "pipeline synthetic", profile=profile)


def pipeline_rtsp(args, camera_fps: float, profile: bool = False) -> dict:
    from rtsp import RtspServer

    servers = [
        RtspServer(mode="synthetic", width=args.width, height=args.height, fps=math.ceil(camera_fps), seed=i)
        for i in range(args.cameras)
    ]
    try:
        for s in servers:
            s.start()
        return run_pipeline(args, [s.url for s in servers], "pipeline rtsp", tuple(s.pid for s in servers), profile)
    finally:
        for s in servers:
            s.stop()


# -- the run ---------------------------------------------------------------------------------------------
def child(args, kind: str, **extra) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        args.model,
        "--size",
        f"{args.width}x{args.height}",
        "--seconds",
        str(args.seconds),
        "--device",
        args.device,
        "--precision",
        extra.pop("precision", args.precision),
        "--cache-dir",
        str(args.cache_dir),
        *(["--xla"] if args.xla else []),
    ] + [f"--{k}={v}" for k, v in extra.items()]
    print(f"  {kind} {extra or ''} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {extra}: failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in (
        "inspectd",
        "tensorflow",
        "keras",
        "onnxruntime",
        "onnxruntime-gpu",
        "openvino",
        "tf2onnx",
        "opencv-python-headless",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine(args) -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPU cores ({model}), " + (_gpu_name() if args.device.startswith("gpu") else "no GPU used")


def _gpu_name() -> str:
    try:
        return (
            "GPU "
            + subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        return "GPU (nvidia-smi not found)"


def _median_round(rounds: list[dict]) -> int:
    """The round whose synthetic pipeline / bare ratio is the median (the lower middle one for an even count):
    its bare model, pipelines and thread tables are shown together."""
    order = sorted(range(len(rounds)), key=lambda i: rounds[i]["synthetic"]["fps"] / rounds[i]["bare"]["fps"])
    return order[(len(order) - 1) // 2]


def _gate_data(args) -> tuple[list[str], list[str]]:
    """(--calibration, --validation) for `inspectd export`; for builtin:demo, synthetic sets of seeds it never saw."""
    if args.model == "builtin:demo":  # its training set is not on this machine: synthetic sets stand in
        data = args.cache_dir / "gate-data"
        for name, seed, n in (("calibration", 11, 300), ("validation", 12, 200)):
            if getattr(args, name) is None:
                if not (data / name).is_dir():
                    size, folder = f"{args.width}x{args.height}", str(data / name)
                    cmd = [sys.executable, "-m", "inspectd", "synth", folder, "--n", str(n), "--size", size, "--seed", str(seed)]
                    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
                setattr(args, name, data / name)
    calibration = ["--calibration", str(args.calibration)] if args.calibration else []
    return calibration, ["--validation", str(args.validation)] if args.validation else []


def run_gates(args) -> list[dict]:
    """Each precision of --precisions but float32, per runtime that runs it (TensorFlow only on a GPU: its
    bfloat16 on a CPU is an emulation), through `inspectd export`'s quality gate; its record, or why there is none."""
    from inspectd.model.deployable import model_sha256, resolve_model_path
    from inspectd.model.gates import gate_file
    from inspectd.pipeline.runtimes import SUPPORTED

    tf_ok = args.device.startswith("gpu")
    runs = [r for r in args.runtimes if tf_ok or r != "tensorflow"]
    wanted = [(r, p) for p in args.precisions if p != "float32" for r in runs if p in SUPPORTED.get(r, ())]
    if not wanted:
        return []
    sha = model_sha256(resolve_model_path(args.model))
    calibration, validation = _gate_data(args)
    out = []
    for runtime, precision in wanted:
        print(f"  gate {runtime} {precision} ...", file=sys.stderr, flush=True)
        record, started = gate_file(args.cache_dir, sha, runtime, precision), time.time() - 1
        record.unlink(missing_ok=True)  # an earlier run's record must not stand for this one
        what = ["--int8", *calibration] if precision == "int8" else ["--precision", precision]
        cmd = [sys.executable, "-m", "inspectd", "export", args.model, "--runtime", runtime, *what, *validation]
        done = subprocess.run([*cmd, "--cache-dir", str(args.cache_dir)], capture_output=True, text=True, cwd=ROOT)
        if record.is_file() and done.returncode in (0, 65) and record.stat().st_mtime >= started:
            rec = json.loads(record.read_text())
            out.append({**rec, "runtime": runtime, "precision": precision, "passed": done.returncode == 0})
        else:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            out.append({"runtime": runtime, "precision": precision, "passed": False, "why": f"exit {done.returncode}: {last}"})
    return out


def _best_vs_tensorflow(bare: list[dict]) -> float | None:
    """The fastest float32 runtime at batch 1 over TensorFlow's (None when TensorFlow was not measured)."""
    tf = next((r["fps"] for r in bare if r["runtime"] == "tensorflow" and r["batch"] == 1), None)
    best = max((r["fps"] for r in bare if r["batch"] == 1 and r["precision"] == "float32"), default=None)
    return round(best / tf, 2) if tf and best else None


def measure(args) -> dict:
    res = {
        "command": " ".join(["benchmarks/performance.py", *sys.argv[1:]]),
        "machine": _machine(args),
        "versions": _versions(),
        "options": {k: v for k, v in vars(args).items() if k != "child"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print("reference loop", file=sys.stderr)
    res["reference"] = child(args, "reference")
    res["gates"] = run_gates(args)
    res["bare"] = []
    for runtime in args.runtimes:
        for batch in args.batches:
            row = child(args, "bare", runtime=runtime, batch=batch, precision="float32")
            res["bare"].append({"runtime": runtime, "batch": batch, **row})
    for gate in (g for g in res["gates"] if g["passed"]):
        for batch in args.batches:
            row = child(args, "bare", runtime=gate["runtime"], batch=batch, precision=gate["precision"])
            res["bare"].append({"runtime": gate["runtime"], "batch": batch, **row})
    b = args.pipeline_batch
    best = max((r for r in res["bare"] if r["batch"] == b and r["precision"] == args.precision), key=lambda r: r["fps"])
    res["best_bare"] = {"runtime": best["runtime"], "batch": b, "fps": best["fps"], "batch_p50_ms": best["batch_p50_ms"]}
    args.pipeline_runtime = args.pipeline_runtime or best["runtime"]
    same = next(
        r for r in res["bare"] if r["batch"] == b and r["runtime"] == args.pipeline_runtime and r["precision"] == args.precision
    )
    camera_fps = args.offered * same["fps"] / args.cameras
    res["camera_fps"] = round(camera_fps, 1)
    print(
        f"pipelines: {args.cameras} cameras x {camera_fps:.1f} frames/s, batch {b}, {args.pipeline_runtime} "
        f"(best bare at batch {b}: {best['runtime']} {best['fps']} frames/s); {args.repeat} round(s)",
        file=sys.stderr,
    )
    # Rounds interleave the bare model (the pipeline's runtime and batch) with both pipelines, so that each ratio
    # compares measurements minutes apart: this shared machine drifts by 20-30 % between runs.
    rounds = []
    for i in range(args.repeat):
        bare = (
            same if i == 0 else {"runtime": same["runtime"], "batch": b, **child(args, "bare", runtime=same["runtime"], batch=b)}
        )
        # --profile: py-spy in the first round only (a window of its own after the measured one)
        rounds.append(
            {
                "bare": bare,
                "synthetic": pipeline_synthetic(args, camera_fps, profile=i == 0),
                "rtsp": pipeline_rtsp(args, camera_fps, profile=i == 0),
            }
        )
    res["rounds"] = rounds
    k = res["median_round"] = _median_round(rounds)
    res["bare_in_rounds"], res["pipeline_synthetic"], res["pipeline_rtsp"] = (
        rounds[k]["bare"],
        rounds[k]["synthetic"],
        rounds[k]["rtsp"],
    )
    res["profiles"] = {kind: rounds[0][kind].get("profile") for kind in ("synthetic", "rtsp")}
    ratio = lambda key: [round(r[key]["fps"] / r["bare"]["fps"], 3) for r in rounds]  # noqa: E731
    median = lambda xs: float(np.median(xs))  # noqa: E731
    bound = 2 * median([r["bare"]["batch_p50_ms"] for r in rounds]) / 1000 + 0.010
    res["ratios"] = {
        "synthetic_vs_bare_rounds": ratio("synthetic"),
        "rtsp_vs_bare_rounds": ratio("rtsp"),
        "synthetic_vs_bare": round(median(ratio("synthetic")), 3),
        "rtsp_vs_bare": round(median(ratio("rtsp")), 3),
        "synthetic_vs_reference": round(res["pipeline_synthetic"]["fps"] / res["reference"]["fps"], 2),
        "best_bare_vs_tensorflow_b1": _best_vs_tensorflow(res["bare"]),
        "p99_bound_s": round(bound, 4),
        "p99_s": [max(r["synthetic"]["end_to_end_p99_s"] or 9, r["rtsp"]["end_to_end_p99_s"] or 9) for r in rounds],
    }
    return res


def _threads_table(res: dict) -> list[str]:
    """CPU % of one core per thread (group), the bare model beside each pipeline: where the cores went."""
    cols = [
        ("bare model", res["bare_in_rounds"]),
        ("pipeline, synthetic", res["pipeline_synthetic"]),
        ("pipeline, RTSP", res["pipeline_rtsp"]),
    ]
    groups = list(dict.fromkeys(g for _, m in cols for g in (m.get("threads") or {})))
    lines = [
        "| thread (group) | " + " | ".join(f"{name}: CPU % / preempted per s" for name, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for g in groups:
        cells = [(m.get("threads") or {}).get(g) for _, m in cols]
        lines.append(f"| {g} | " + " | ".join(f"{c['cpu_percent']} / {c['preempted_per_s']}" if c else "-" for c in cells) + " |")
    return lines


def _gates_table(res: dict) -> list[str]:
    """Each precision's gate against float32 (the measures, what the gate said) and its speed-up over float32 on the
    same runtime at each batch size."""

    def fps(runtime: str, precision: str, batch: int) -> float | None:
        key = (runtime, precision, batch)
        return next((r["fps"] for r in res["bare"] if (r["runtime"], r.get("precision"), r["batch"]) == key), None)

    batches = sorted({r["batch"] for r in res["bare"]})
    head = "| runtime, precision | image ROC-AUC (float32) | pixel ROC-AUC | region IoU | verdicts changed | gate |"
    lines = [
        "Precisions: the quality gate (`inspectd export --precision`, on images the calibration did not see) and the bare "
        "model's frames/s over float32 on the same runtime:",
        "",
        head + "".join(f" b{b} frames/s (x float32) |" for b in batches),
        "|---" * (6 + len(batches)) + "|",
    ]
    for g in res["gates"]:
        rt, p = g["runtime"], g["precision"]
        if "drop" not in g:
            lines.append(f"| {rt} {p} | - | - | - | - | {g['why']} |" + " - |" * len(batches))
            continue
        ref, cand = g["float32"], g[p]
        measures = ("image_auc", "pixel_auc", "region_iou")
        cell = {k: "-" if cand.get(k) is None else f"{cand[k]:.4f} ({ref[k]:.4f})" for k in measures}
        speeds = ""
        for b in batches:
            base, mine = fps(rt, "float32", b), fps(rt, p, b)
            speeds += f" {mine} (x{mine / base:.2f}) |" if base and mine else " - |"
        verdict = "passed" if g["passed"] else "refused"
        lines.append(
            f"| {rt} {p} | {cell['image_auc']} | {cell['pixel_auc']} | {cell['region_iou']} | "
            f"{g['drop']['verdict_change']:.1%} | {verdict} |{speeds}"
        )
    return lines


def markdown(res: dict) -> str:
    o, r = res["options"], res["ratios"]
    n = len(res["rounds"])
    lines = [
        f"`{res['command']}` — {res['machine']}; model {o['model_label']}, camera frames {o['width']}x{o['height']}; "
        f"{res['started']}",
        "",
        "| measurement | runtime | batch | frames/s | batch p50 / p99 ms | capture-to-publish p50 / p99 s | "
        "CPU % | peak RSS MB | residual |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = res["reference"]
    lines.append(
        f"| reference loop (`model.predict` per frame) | tensorflow | 1 | {ref['fps']} | {ref['batch_p50_ms']} / "
        f"{ref['batch_p99_ms']} | - | {ref['cpu_percent']} | - | - |"
    )
    for row in res["bare"]:
        precision = row.get("precision", "float32")
        lines.append(
            f"| bare model{'' if precision == 'float32' else ', ' + precision} | {row['runtime']} | {row['batch']} | "
            f"{row['fps']} | {row['batch_p50_ms']} / {row['batch_p99_ms']} | - | {row['cpu_percent']} | "
            f"{row['peak_rss_mb']} | - |"
        )
    spread = lambda key: ", ".join(str(x[key]["fps"]) for x in res["rounds"])  # noqa: E731
    which = f"round {res['median_round'] + 1} of {n}, the median synthetic ratio" if n > 1 else ""
    if n > 1:
        b = res["bare_in_rounds"]
        lines.append(
            f"| bare model, in the rounds ({which}; all rounds: {spread('bare')}) | {b['runtime']} | {b['batch']} | "
            f"{b['fps']} | {b['batch_p50_ms']} / {b['batch_p99_ms']} | - | {b['cpu_percent']} | "
            f"{b['peak_rss_mb']} | - |"
        )
    for key, short, name in (
        ("pipeline_synthetic", "synthetic", "pipeline, synthetic cameras"),
        ("pipeline_rtsp", "rtsp", "pipeline, RTSP cameras"),
    ):
        p = res[key]
        rounds = f"; {which}; all rounds: {spread(short)}" if n > 1 else ""
        lines.append(
            f"| {name} ({p['cameras']} x {res['camera_fps']} frames/s offered{rounds}) | {p['runtime']} | "
            f"{o['pipeline_batch']} | {p['fps']} | {p['inference_mean_ms']} (mean) | {p['end_to_end_p50_s']} / "
            f"{p['end_to_end_p99_s']} | {p['cpu_percent']} | {p['peak_rss_mb']} | {p['residual']} |"
        )
    syn, rtsp = res["pipeline_synthetic"], res["pipeline_rtsp"]
    ok = lambda cond: "met" if cond else "**not met**"  # noqa: E731
    each = lambda xs: f" (rounds: {', '.join(map(str, xs))})" if n > 1 else ""  # noqa: E731
    lines += [
        "",
        f"Ratios{' (median over the rounds)' if n > 1 else ''}: pipeline / bare {syn['runtime']} at batch "
        f"{o['pipeline_batch']} {r['synthetic_vs_bare']} (synthetic){each(r['synthetic_vs_bare_rounds'])}, "
        f"{r['rtsp_vs_bare']} (RTSP){each(r['rtsp_vs_bare_rounds'])}; pipeline / reference loop "
        f"{r['synthetic_vs_reference']}; best runtime / TensorFlow at batch 1 {r['best_bare_vs_tensorflow_b1']}.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| synthetic pipeline >= 0.90 x bare | {r['synthetic_vs_bare']} | {ok(r['synthetic_vs_bare'] >= 0.9)} |",
        f"| RTSP pipeline >= 0.80 x bare | {r['rtsp_vs_bare']} | {ok(r['rtsp_vs_bare'] >= 0.8)} |",
        f"| pipeline >= 3 x reference loop | {r['synthetic_vs_reference']} | {ok(r['synthetic_vs_reference'] >= 3)} |",
        f"| p99 capture-to-publish <= 2 x bare batch p50 + max_wait = {r['p99_bound_s']} s | {syn['end_to_end_p99_s']} "
        f"(synthetic), {rtsp['end_to_end_p99_s']} (RTSP) | {ok(max(r['p99_s']) <= r['p99_bound_s'])} |",
        f"| accounting residual 0 | {syn['residual']}, {rtsp['residual']} | {ok(syn['residual'] == rtsp['residual'] == 0)} |",
    ]
    if res.get("gates"):
        lines += ["", *_gates_table(res)]
    if syn.get("threads"):
        lines += [
            "",
            f"CPU per thread (from /proc; Python threads named by py-spy, native ones by their OS name; {which or 'this run'}):",
            "",
            *_threads_table(res),
        ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = lambda r: f"{r['runtime']} {'' if r.get('precision', 'float32') == 'float32' else r['precision'] + ' '}b{r['batch']}"  # noqa: E731
    names = ["reference"] + [label(r) for r in res["bare"]] + ["pipeline synthetic", "pipeline RTSP"]
    fps = (
        [res["reference"]["fps"]]
        + [r["fps"] for r in res["bare"]]
        + [res["pipeline_synthetic"]["fps"], res["pipeline_rtsp"]["fps"]]
    )
    shade = {"float32": "tab:blue", "bfloat16": "tab:purple", "float16": "tab:purple", "int8": "tab:red"}
    colors = ["grey"] + [shade[r.get("precision", "float32")] for r in res["bare"]] + ["tab:green", "tab:olive"]
    fig, ax = plt.subplots(figsize=(10, 4.5 + 0.2 * max(0, len(names) - 10)))
    ax.barh(names[::-1], fps[::-1], color=colors[::-1])
    for i, v in enumerate(fps[::-1]):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.axvline(res["best_bare"]["fps"], color="k", ls=":", lw=1, label=f"best bare model, batch {res['best_bare']['batch']}")
    ax.set_xlabel("frames/s")
    ax.set_title(
        f"{res['options']['model_label']}, {res['options']['width']}x{res['options']['height']} frames, "
        f"{res['machine'].split(' (')[0]}"
    )
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
    ap.add_argument("--pipeline-runtime", help="the daemon's runtime (default: the fastest bare at --pipeline-batch)")
    ap.add_argument("--pipeline-batch", type=int, default=1, help='the daemon\'s max_batch (1: what "auto" takes on a CPU)')
    ap.add_argument(
        "--repeat",
        type=lambda v: max(1, int(v)),
        default=3,
        help="rounds of bare model + both pipelines, interleaved; ratios are the rounds' median",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/performance")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample the pipelines with py-spy (pip install py-spy): CPU share per stage and the top functions, in the JSON",
    )
    ap.add_argument("--device", default="cpu", help="[model] device for everything measured: cpu or gpu:N")
    ap.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "float16", "int8"],
        help="[model] precision. The bare model runs it unchecked (speed only); the pipeline's daemon needs its passed "
        "quality gate in the cache (inspectd export --precision, docs/daemon.md#precision)",
    )
    ap.add_argument("--xla", action="store_true", help="[model] xla (TensorFlow only)")
    ap.add_argument(
        "--precisions",
        default="float32",
        help="precisions of the bare model: float32 plus any of bfloat16, float16, int8, each after its quality gate",
    )
    ap.add_argument("--calibration", type=Path, help="INT8 calibration images (default: the model's training split)")
    ap.add_argument("--validation", type=Path, help="the gates' labelled images (default: the training validation split)")
    ap.add_argument("--cache-dir", type=Path, help="the runs' model cache (default: OUT-cache next to --out)")
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
    args.batches = sorted({int(b) for b in args.batches.split(",")} | {args.pipeline_batch})  # the pipeline's ceiling
    args.runtimes = args.runtimes.split(",")
    args.precisions = [p for p in args.precisions.split(",") if p]
    known = ("float32", "bfloat16", "float16", "int8")
    if any(p not in known for p in args.precisions) or "float32" not in args.precisions:
        ap.error(f"--precisions {','.join(args.precisions)}: float32 and any of {', '.join(known[1:])}")
    if args.precision not in args.precisions:
        ap.error(f"--precision {args.precision}: the pipeline's precision needs its gate: add it to --precisions")
    args.cache_dir = (args.cache_dir or args.out.with_name(args.out.name + "-cache")).resolve()
    res = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
