"""`[model] runtime = "auto"`: measure what runs this model fastest on this machine, once, and remember it.

On a model's first load on a device, each candidate (runtime x OpenVINO's performance hint x batch
size, at the configured precision) runs the model's own input for up to `SECONDS` after one warm-up
call; the fastest in frames/s wins. The table is cached under the cache dir, keyed by the model's
sha256, the precision, the device (CPU or GPU model and core count) and the runtimes' versions, so a
restart loads the choice instead of measuring, and an upgrade or another machine measures again.
The daemon logs the table and exports the choice in `inspectd_model_info`; `inspectd export
--runtime auto` and `inspectd bench` print the same table.

Candidates are opened by a callable the engine passes in (`Opener`), so this module knows nothing of
the runtimes themselves, and tests can measure fakes of known speed.
"""

from __future__ import annotations

__all__ = ["Candidate", "Trial", "Choice", "SECONDS", "MAX_CALLS", "choose", "device_name", "format_table"]

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("inspectd.pipeline.autotune")

SECONDS = 2.0  # per candidate, after a warm-up call: 5 % apart is above the noise of 2 s on 2 cores (docs/performance.md)
MAX_CALLS = 200  # a tiny model stops here, long before SECONDS
FORMAT = "inspectd.autotune/1"


@dataclass(frozen=True)
class Candidate:
    runtime: str
    batch: int
    hint: str = ""  # OpenVINO's PERFORMANCE_HINT; empty for the others

    def label(self) -> str:
        return f"{self.runtime}{'/' + self.hint.lower() if self.hint else ''} b{self.batch}"


@dataclass(frozen=True)
class Trial:
    candidate: Candidate
    fps: float | None  # None: it failed (error says why) or was not measured
    error: str = ""


@dataclass(frozen=True)
class Choice:
    best: Candidate
    trials: tuple[Trial, ...]
    precision: str
    device: str
    cached: bool  # read from the cache (True) or measured now

    def summary(self) -> str:
        """One line: the winner first, then the others by speed (model_info's `auto` label)."""
        ranked = sorted((t for t in self.trials if t.fps), key=lambda t: -(t.fps or 0.0))
        return ", ".join(f"{t.candidate.label()} {t.fps:.1f}/s" for t in ranked)


# (runtime, hint) -> a callable running one batch of uint8 frames (any batch size); raising: the candidate fails
Opener = Callable[[str, str], Callable[[list[np.ndarray]], object]]


def device_name(tf_device: str) -> str:
    """The CPU's model name and the cores this process may use, or the GPU's name."""
    if tf_device.startswith("/GPU"):
        try:
            import tensorflow as tf

            gpu = tf.config.list_physical_devices("GPU")[int(tf_device.rsplit(":", 1)[1])]
            return str(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except Exception:  # noqa: BLE001 - a name for the cache key only
            return tf_device
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{len(os.sched_getaffinity(0))}"


def _cache_file(cache_root: Path, sha256: str, precision: str, device: str, versions: dict[str, str]) -> Path:
    key = json.dumps({"device": device, "versions": versions, "precision": precision}, sort_keys=True)
    return cache_root / "autotune" / f"{sha256[:32]}-{precision}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _load(path: Path) -> tuple[Trial, ...]:
    """The cached trials (none when there are none or the file is unreadable: those are measured again)."""
    try:
        data = json.loads(path.read_text())
        return tuple(Trial(Candidate(**t["candidate"]), t["fps"], t.get("error", "")) for t in data["trials"])
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def _save(path: Path, trials: Sequence[Trial], device: str, versions: dict[str, str]) -> None:
    """Written to a temporary file and renamed: a crash never leaves half a table."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        body = {"format": FORMAT, "device": device, "versions": versions, "measured_at": time.time()}
        tmp.write_text(json.dumps({**body, "trials": [asdict(t) for t in trials]}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("runtime auto: cannot cache the measurement in %s (%s); it runs again at the next start", path, exc)


def measure(run: Callable[[list[np.ndarray]], object], frames: list[np.ndarray], seconds: float, max_calls: int) -> float:
    """Frames/s of `run` on `frames`: one warm-up call, then calls until `seconds` or `max_calls`."""
    run(frames)
    n, t0 = 0, time.perf_counter()
    while n < max_calls and (n < 3 or time.perf_counter() - t0 < seconds):
        run(frames)
        n += 1
    return n * len(frames) / (time.perf_counter() - t0)


def _trials(opener: Opener, wanted: Sequence[Candidate], frame: np.ndarray, seconds: float, max_calls: int) -> list[Trial]:
    """Every candidate measured; one (runtime, hint) is opened once for all its batch sizes."""
    out: list[Trial] = []
    opened: dict[tuple[str, str], Callable | Exception] = {}
    for cand in wanted:
        key = (cand.runtime, cand.hint)
        if key not in opened:
            try:
                opened[key] = opener(cand.runtime, cand.hint)
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the model loses, with the reason
                opened[key] = exc
        runner = opened[key]
        if isinstance(runner, Exception):
            out.append(Trial(cand, None, f"{type(runner).__name__}: {runner}"[:300]))
            continue
        try:
            fps = measure(runner, [frame] * cand.batch, seconds, max_calls)
        except Exception as exc:  # noqa: BLE001 - as above
            out.append(Trial(cand, None, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        out.append(Trial(cand, round(fps, 2)))
        log.info("runtime auto: %s %.1f frames/s", cand.label(), fps)
    return out


def choose(
    opener: Opener,
    wanted: Sequence[Candidate],
    frame: np.ndarray,
    *,
    sha256: str,
    precision: str,
    tf_device: str,
    versions: dict[str, str],
    cache_root: Path | None,
    seconds: float = SECONDS,
    max_calls: int = MAX_CALLS,
    fresh: bool = False,
) -> Choice:
    """The fastest of `wanted` on `frame` (the model's input), from the cache or measured now (and cached);
    `fresh`: measure all of them again."""
    device = device_name(tf_device)
    path = _cache_file(cache_root, sha256, precision, device, versions) if cache_root is not None else None
    known = _load(path) if path is not None else ()
    if fresh:  # measured again: the wanted ones; what else the cache holds (other batch sizes) stays
        known = tuple(t for t in known if t.candidate not in set(wanted))
    # A candidate that failed stays failed (opening it again could mean a conversion at every start) until the
    # versions change or `inspectd export --runtime auto` measures afresh; the table says why it failed.
    missing = [c for c in wanted if c not in {t.candidate for t in known}]
    cached = not missing
    trials = known
    if missing:  # measured now, added to what the cache had (another model table asked for other batch sizes)
        log.info("runtime auto: measuring %d candidates, up to %.0f s each (once per model and machine)", len(missing), seconds)
        measured = _trials(opener, missing, frame, seconds, max_calls)
        trials = (*(t for t in known if t.candidate not in set(missing)), *measured)
        if path is not None and any(t.fps for t in measured):
            _save(path, trials, device, versions)
    ranked = [t for t in trials if t.candidate in set(wanted) and t.fps]
    if not ranked:
        errors = "; ".join(f"{t.candidate.label()}: {t.error}" for t in trials)
        raise RuntimeError(f"no runtime could run the model: {errors}")
    best = max(ranked, key=lambda t: t.fps or 0.0).candidate
    return Choice(best, tuple(t for t in trials if t.candidate in set(wanted)), precision, device, cached)


def format_table(choice: Choice) -> str:
    """The measurement as a text table, fastest first; the winner marked."""
    rows = sorted(choice.trials, key=lambda t: -(t.fps or -1.0))
    lines = [
        f"runtime auto on {choice.device}, precision {choice.precision}"
        f" ({'cached measurement' if choice.cached else 'measured now'}):",
        f"  {'candidate':<28} {'frames/s':>9}",
    ]
    for t in rows:
        mark = "  <- chosen" if t.candidate == choice.best else ""
        value = f"{t.fps:9.1f}" if t.fps else f"{'failed':>9}  {t.error[:90]}"
        lines.append(f"  {t.candidate.label():<28} {value}{mark}")
    return "\n".join(lines)
