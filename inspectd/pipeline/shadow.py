"""A shadow model: run on (a sample of) a production model's frames, never publishing; how often and how well it
agrees with the production model, measured on the line's own frames (docs/models.md#a-shadow-model).

    shadow = Shadow("top", "top-v2", metrics, store, production_idle=pipeline.production_idle)
    shadow.start()
    shadow.offer(job)         # from the production model's inference thread, after its batch: never blocks
    shadow.stop(timeout=5)    # the measurements saved

The shadow yields to production: it starts a job only once production is idle (no frame waiting, no model
call, nothing in post-processing; a job that waits for that longer than YIELD_WAIT_S is skipped), and its model
call in flight ends when a production frame arrives (ONNX Runtime, the CPU default: `runtimes.Interrupt`), both
counted as `yield`; after either it backs off (jobs skipped as `yield` for 1 s, doubling up to 30 s while it
keeps being cut off: a line too busy for it costs production almost nothing). A job that finds its
queue full is skipped (`busy`). Its thread runs at the lowest CPU priority (nice 19), which is what is left
with the other runtimes. Nothing of it is on the production path but the hand-over of a reference to the
batch and, per frame captured, one flag set (docs/models.md measures what it costs).

Per frame it compares the two verdicts (a confusion count), the two scores (their correlation) and, when both
say defect, the two models' regions (their IoU, on the frame scaled to at most 160 pixels wide). A frame where
the verdicts differ is a disagreement: kept for review in the store (`ShadowStore`), the frame with both maps.
"""

from __future__ import annotations

__all__ = ["Shadow", "ShadowJob", "ShadowStore", "Agreement", "store_dir", "SHADOW_DIR", "KEEP_DISAGREEMENTS"]

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from inspectd.frames import Frame
from inspectd.imageio import encode_jpeg, encode_png
from inspectd.metrics import Metrics
from inspectd.pipeline.context import ModelRun
from inspectd.pipeline.postprocess import InspectOptions, locate, probability, to_mask_u8, upsample
from inspectd.pipeline.runtimes import Interrupt, Interrupted
from inspectd.threads import name_this_thread

log = logging.getLogger("inspectd.pipeline.shadow")

SHADOW_DIR = ".shadow"  # under [archive] dir: hidden from the archive's own entries (ROOT/camera/day/entry)
KEEP_DISAGREEMENTS = 1000  # per pair of model files: the oldest go first (a frame JPEG and two PNGs each)
IOU_WIDTH = 160  # regions are compared on the frame scaled to this width (at most)
SAVE_EVERY_S = 10.0  # the summary is written this often (and at stop)
YIELD_WAIT_S = 0.5  # a job waits at most this long for production to be idle, then it is skipped (`yield`)
BACKOFF_S = (1.0, 30.0)  # after an interrupted call, jobs are skipped this long, doubling while calls keep being cut
VERDICTS = ("defect", "ok")
_IDLE = object()  # what the thread's queue wait gives when nothing came: time to save the summary


@dataclass(frozen=True, eq=False)
class ShadowJob:
    """A production batch the shadow may also run: the frames, and what production made of them."""

    frames: tuple[Frame, ...]
    scores: tuple[float, ...]  # production's
    cams: tuple[np.ndarray, ...]  # production's cam logits
    options: tuple[InspectOptions, ...]  # production's, per frame (its camera's)
    production: ModelRun
    shadow: ModelRun
    shadow_options: InspectOptions  # the shadow model's own threshold and mask rule


@dataclass
class Agreement:
    """What the comparisons add up to: plain sums, so that they carry across restarts (the summary)."""

    confusion: dict[str, int] = field(default_factory=lambda: {f"{p}/{s}": 0 for p in VERDICTS for s in VERDICTS})
    sums: list[float] = field(default_factory=lambda: [0.0] * 6)  # n, Σp, Σs, Σp², Σs², Σps (scores)
    iou_sum: float = 0.0
    iou_count: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"busy": 0, "yield": 0})
    disagreements: int = 0  # frames whose verdicts differ (each kept for review while the store has room)

    def add(self, production: bool, shadow: bool, p: float, s: float, iou: float | None) -> None:
        self.confusion[f"{VERDICTS[not production]}/{VERDICTS[not shadow]}"] += 1
        for i, v in enumerate((1.0, p, s, p * p, s * s, p * s)):
            self.sums[i] += v
        if iou is not None:
            self.iou_sum += iou
            self.iou_count += 1
        self.disagreements += production != shadow

    @property
    def frames(self) -> int:
        return sum(self.confusion.values())

    @property
    def agreement(self) -> float | None:
        """The share of frames on which both verdicts are the same."""
        n = self.frames
        return None if not n else (self.confusion["defect/defect"] + self.confusion["ok/ok"]) / n

    @property
    def correlation(self) -> float | None:
        """Pearson's correlation of the two scores (None until it is defined: two frames, scores that vary)."""
        n, sp, ss, spp, sss, sps = self.sums
        var = (n * spp - sp * sp) * (n * sss - ss * ss)
        return None if n < 2 or var <= 0 else (n * sps - sp * ss) / math.sqrt(var)

    @property
    def iou(self) -> float | None:
        """The mean IoU of the two models' regions on the frames both call defective."""
        return self.iou_sum / self.iou_count if self.iou_count else None

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "agreement": self.agreement,
            "confusion": dict(self.confusion),
            "score_correlation": self.correlation,
            "region_iou_mean": self.iou,
            "region_iou_frames": self.iou_count,
            "disagreements": self.disagreements,
            "skipped": dict(self.skipped),
            "sums": list(self.sums),
            "iou_sum": self.iou_sum,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Agreement:
        out = cls()
        out.confusion.update({k: int(v) for k, v in data["confusion"].items() if k in out.confusion})
        out.sums = [float(v) for v in data["sums"]][:6]
        out.iou_sum, out.iou_count = float(data["iou_sum"]), int(data["region_iou_frames"])
        out.skipped.update({k: int(v) for k, v in data["skipped"].items() if k in out.skipped})
        out.disagreements = int(data["disagreements"])
        return out


def store_dir(root: Path, model: str, shadow: str, production_sha256: str, shadow_sha256: str) -> Path:
    """Where one pair of model files keeps its measurements: ROOT/.shadow/MODEL/SHADOW/<sha12>-<sha12>."""
    return Path(root) / SHADOW_DIR / model / shadow / f"{production_sha256[:12]}-{shadow_sha256[:12]}"


class ShadowStore:
    """The summary (`summary.json`) and the disagreements (`disagreements/<time>_<camera>_<seq>/`) of one pair of
    model files. Written by the shadow's thread only; every file lands complete (a temporary, then a rename)."""

    def __init__(self, folder: Path, keep: int = KEEP_DISAGREEMENTS):
        self.folder, self.keep = Path(folder), keep
        self.cases = self.folder / "disagreements"

    def load(self) -> Agreement:
        """What earlier runs measured with these two files (a fresh count if none, or if it cannot be read)."""
        path = self.folder / "summary.json"
        try:
            return Agreement.from_dict(json.loads(path.read_text())["agreement"])
        except FileNotFoundError:
            return Agreement()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("shadow summary %s unreadable (%s): counting from zero", path, exc)
            return Agreement()

    def save(self, summary: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.folder / ".summary.json.tmp"
        temp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temp, self.folder / "summary.json")

    def keep_case(self, name: str, files: dict[str, bytes], record: dict) -> None:
        """One disagreement, complete or not at all; the oldest beyond `keep` removed."""
        self.cases.mkdir(parents=True, exist_ok=True)
        temp, final = self.cases / f".tmp-{name}", self.cases / name
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        for file, data in {**files, "record.json": (json.dumps(record, indent=2) + "\n").encode()}.items():
            (temp / file).write_bytes(data)
        if final.exists():
            shutil.rmtree(temp)
            return
        os.replace(temp, final)
        kept = sorted(p for p in self.cases.iterdir() if not p.name.startswith("."))
        for old in kept[: max(0, len(kept) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


class Shadow:
    """One shadow model's thread: takes the jobs the production model's thread offers, compares, counts, keeps."""

    def __init__(
        self,
        model: str,
        shadow: str,
        metrics: Metrics,
        store: ShadowStore | None,
        production_idle: Callable[[], bool],
        queue_size: int = 2,
        meta: dict | None = None,
    ):
        self.model, self.shadow, self.metrics, self.store = model, shadow, metrics, store
        self._production_idle = production_idle
        self.interrupt = Interrupt()  # set by the pipeline when a production frame arrives: the shadow's call ends
        self._backoff_s = 0.0  # 0, or how long the last back-off was
        self._resume_at = 0.0  # monotonic: jobs before this are skipped (`yield`)
        self._jobs: queue.Queue[object] = queue.Queue(queue_size)  # ShadowJob, _IDLE never, None: stop
        self._thread = threading.Thread(target=self._run, name=f"shadow-{shadow}"[:64], daemon=True)
        self._meta = meta or {}
        self.agreement = store.load() if store is not None else Agreement()
        self._since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._lock = threading.Lock()  # the agreement: written by the thread, read by scrapes and the summary
        labels = {"model": model, "shadow": shadow}
        for p in VERDICTS:
            for s in VERDICTS:
                metrics.shadow_frames.labels(**labels, production=p, shadow_verdict=s)
        for reason in self.agreement.skipped:
            metrics.shadow_skipped.labels(**labels, reason=reason)
        metrics.shadow_region_iou.labels(**labels)
        metrics.shadow_score_correlation.labels(**labels).set_function(lambda: self._gauge(lambda a: a.correlation))
        metrics.shadow_agreement.labels(**labels).set_function(lambda: self._gauge(lambda a: a.agreement))

    def _gauge(self, value: Callable[[Agreement], float | None]) -> float:
        with self._lock:
            v = value(self.agreement)
        return float("nan") if v is None else v

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Shadow:
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Finish the job in hand (the queued ones are dropped), save the summary."""
        while True:  # make room for the stop mark: queued jobs are not worth the wait
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self.interrupt.set()  # the call in hand ends now (ONNX Runtime)
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:  # a production thread refilled it meanwhile: the thread is a daemon, it goes with us
            pass
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        self._save()
        for gauge in (self.metrics.shadow_score_correlation, self.metrics.shadow_agreement):
            try:
                gauge.remove(self.model, self.shadow)  # its function reads this object: gone with it
            except KeyError:
                pass

    # -- the production side -------------------------------------------------------------------------------
    def offer(self, job: ShadowJob) -> None:
        """From a production inference thread: queued for the shadow, or skipped (`busy`, counted). Never blocks."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._skip("busy", len(job.frames))

    def _skip(self, reason: str, frames: int) -> None:
        with self._lock:
            self.agreement.skipped[reason] += frames
        self.metrics.shadow_skipped.labels(model=self.model, shadow=self.shadow, reason=reason).inc(frames)

    # -- the shadow's thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread(self._thread.name)
        _lowest_priority(self.shadow)
        saved = time.monotonic()
        while True:
            try:
                job = self._jobs.get(timeout=SAVE_EVERY_S)
            except queue.Empty:
                job = _IDLE
            if job is None:  # stop()
                return
            if isinstance(job, ShadowJob):
                self._handle(job)
            if time.monotonic() - saved >= SAVE_EVERY_S:
                self._save()
                saved = time.monotonic()

    def _handle(self, job: ShadowJob) -> None:
        if time.monotonic() < self._resume_at:  # backing off: production's gaps were too short for a call
            self._skip("yield", len(job.frames))
            return
        self.interrupt.clear()  # from here on, a production frame ends the call (even before it begins)
        give_up = time.monotonic() + YIELD_WAIT_S
        while not self._production_idle():  # production's frames first (a few ms at a moderate load)
            if time.monotonic() > give_up:  # a busy line: skip, and back off as after an interrupted call
                self._skip("yield", len(job.frames))
                self._back_off()
                return
            time.sleep(0.01)
        try:
            self._compare(job)
        except Exception:
            log.exception("shadow %s of %s: a batch failed; going on", self.shadow, self.model)

    def _back_off(self) -> None:
        """Skip the jobs of the next 1 s, 2 s, 4 s ... up to 30 s while production keeps needing the cores."""
        self._backoff_s = min(BACKOFF_S[1], 2 * self._backoff_s) if self._backoff_s else BACKOFF_S[0]
        self._resume_at = time.monotonic() + self._backoff_s

    def _compare(self, job: ShadowJob) -> None:
        t0 = time.monotonic()
        try:
            scores, cams = job.shadow.engine.infer([f.image for f in job.frames], self.interrupt)
        except Interrupted:  # a production frame came: the cores are its; try again later, later each time
            self._skip("yield", len(job.frames))
            self._back_off()
            return
        self._backoff_s = 0.0
        self.metrics.inference_seconds.labels(model=self.shadow).observe(time.monotonic() - t0)
        for i, frame in enumerate(job.frames):
            p_opts, s_opts = job.options[i], job.shadow_options
            p_score, s_score = float(job.scores[i]), float(scores[i])
            p_defect, s_defect = p_score >= p_opts.threshold, s_score >= s_opts.threshold
            iou = _region_iou(frame, job.cams[i], cams[i], p_opts, s_opts) if p_defect and s_defect else None
            with self._lock:
                self.agreement.add(p_defect, s_defect, p_score, s_score, iou)
            labels = {"model": self.model, "shadow": self.shadow}
            self.metrics.shadow_frames.labels(
                **labels, production=VERDICTS[not p_defect], shadow_verdict=VERDICTS[not s_defect]
            ).inc()
            if iou is not None:
                self.metrics.shadow_region_iou.labels(**labels).observe(iou)
            if p_defect != s_defect and self.store is not None:
                self._keep(job, i, s_score, cams[i])

    def _keep(self, job: ShadowJob, i: int, s_score: float, s_cam: np.ndarray) -> None:
        frame = job.frames[i]
        when = datetime.fromtimestamp(frame.captured_at, timezone.utc)
        name = f"{when.strftime('%Y%m%dT%H%M%S.%fZ')}_{frame.camera}_{frame.seq}"
        record = {
            "camera": frame.camera,
            "frame_seq": frame.seq,
            "captured_at": when.isoformat().replace("+00:00", "Z"),
            "production": _verdict(job.production, float(job.scores[i]), job.options[i].threshold),
            "shadow": _verdict(job.shadow, s_score, job.shadow_options.threshold),
            "files": {"frame.jpg": "the frame", "production.png": "production's map", "shadow.png": "the shadow's map"},
        }
        maps = {
            f"{who}.png": encode_png(to_mask_u8(probability(upsample(np.asarray(cam, np.float32), frame.width, frame.height))))
            for who, cam in (("production", job.cams[i]), ("shadow", s_cam))
        }
        try:
            self.store.keep_case(name, {"frame.jpg": encode_jpeg(frame.image, 90), **maps}, record)  # type: ignore[union-attr]
        except OSError as exc:
            log.warning("shadow %s: disagreement %s not kept: %s", self.shadow, name, exc)

    def summary(self) -> dict:
        with self._lock:
            agreement = self.agreement.as_dict()
        return {
            "model": self.model,
            "shadow": self.shadow,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "this_run_since": self._since,
            **self._meta,
            "agreement": agreement,
        }

    def _save(self) -> None:
        if self.store is None:
            return
        try:
            self.store.save(self.summary())
        except OSError as exc:
            log.warning("shadow %s: summary not saved: %s", self.shadow, exc)


def _verdict(run: ModelRun, score: float, threshold: float) -> dict:
    return {**run.model, "score": round(score, 6), "threshold": threshold, "is_defect": score >= threshold}


def _region_iou(frame: Frame, p_cam: np.ndarray, s_cam: np.ndarray, p_opts: InspectOptions, s_opts: InspectOptions) -> float:
    """IoU of the two models' regions (each under its own mask rule), on the frame scaled to IOU_WIDTH at most."""
    scale = min(1.0, IOU_WIDTH / frame.width)
    w, h = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
    masks = [
        locate(cam, w, h, opts.mask_rule, True, max(1, round(opts.min_region_px * scale * scale))).kept
        for cam, opts in ((p_cam, p_opts), (s_cam, s_opts))
    ]
    a, b = (m > 0 for m in masks)  # type: ignore[operator]
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _lowest_priority(shadow: str) -> None:
    """This thread (Linux: a thread's own nice value) at nice 19: production's threads get the cores first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError) as exc:
        log.warning("shadow %s: cannot lower its thread's priority (%s); it still skips while production waits", shadow, exc)
