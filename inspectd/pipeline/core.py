"""The frame's route, in one place: camera -> board -> batcher -> model -> post-processing -> publisher.

    pipeline = Pipeline(context, metrics, publisher, workers=2)
    pipeline.start()
    worker = CameraWorker(cfg, sink=pipeline.put, ...)   # capture threads hand frames in here
    pipeline.swap(new_context)                           # a reload: one assignment, between batches
    pipeline.stop(timeout=10)                            # finish the batch in flight, drain post-processing

Threads: the capture threads call `put`; an inference thread per model (`inference-<model id>`, a
"lane") forms a batch of its model's cameras with the current context's limit for that model and
runs it with that same context (a thread per model, not one serving the models in turn: measured
in docs/models.md); a pool of post-processing
threads turns each result into an Inspection; each camera's inspections are then handed on in
capture order (a frame whose post-processing finished early waits for the ones before it), through
the camera's defect-episode tracker, to the publisher, which never blocks.
Every captured frame ends inferred or dropped with a reason (DropReason): `in_flight()` counts the
rest, so captured = inferred + dropped + in flight holds for every camera at any quiet moment and
with in flight = 0 after `stop()`. A camera in part mode (docs/parts.md) adds a second promise, kept by
`parts` (a PartLedger) and its `deadlines` thread: every part gets exactly one verdict, the model's or
not_inspected, by its deadline; captured = parts decided + parts open.
"""

from __future__ import annotations

__all__ = ["Pipeline", "FREEZE_ENV"]

import functools
import logging
import os
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from inspectd.frames import Batch, DropReason, Frame, Inspection, PartResult, Verdict
from inspectd.metrics import Metrics
from inspectd.pipeline.batching import Batcher, FrameBoard
from inspectd.pipeline.context import InferenceContext, ModelRun
from inspectd.pipeline.episodes import Episode, EpisodeTracker
from inspectd.pipeline.parts import REASONS, PartLedger
from inspectd.pipeline.postprocess import InspectOptions, inspect
from inspectd.pipeline.shadow import Shadow, ShadowJob, ShadowStore, store_dir
from inspectd.threads import name_this_thread

log = logging.getLogger("inspectd.pipeline")

# Test-only hook: while the file named by this variable exists, the model call blocks (a hung
# inference, to prove that the watchdog pings stop). Never set in production.
FREEZE_ENV = "INSPECTD_TEST_FREEZE_INFERENCE"


class InspectionSink(Protocol):
    """Where inspections go (the ZeroMQ publisher, which also feeds the archive): must never block."""

    def publish_inspection(self, insp: Inspection, model: dict, results: bool = False, defect_event: bool = True) -> None: ...

    def publish_episode(self, episode: Episode, model: dict, best_event: bool) -> None: ...


Observer = Callable[[Frame, float, np.ndarray, InspectOptions], None]
PartSink = Callable[[PartResult, dict], None]  # a part's verdict and its model ({"id", "name", "sha256"}): never blocks

_DEADLINE_TICK_S = 0.2  # the deadline thread wakes at least this often (stop requests)
_RETIRE_WAIT_S = 5.0  # a reload waits this long at most for a removed model's or shadow's call in flight


def _part_reason(reason: DropReason) -> str:
    """A part whose frame is dropped for `reason` ends not_inspected for the same reason (the names are shared);
    a reason parts cannot have (stale, fps_limit) would be a bug: `error`."""
    return reason.value if reason.value in REASONS else "error"


class _Lane:
    """One model's inference thread, and what the watchdog and the frame accounts read of it."""

    def __init__(self, model: str, target: Callable[[_Lane], None]):
        self.model = model
        self.thread = threading.Thread(target=target, args=(self,), name=f"inference-{model}"[:64], daemon=True)
        self.retired = threading.Event()  # the model was removed by a reload: the thread ends after its batch
        self.running: Batch | None = None  # the batch inside the model call (in flight)
        self.busy_since: float | None = None  # set while inside the model call: a hung inference shows here
        self.heartbeat_mono = time.monotonic()  # loop liveness, for the watchdog
        self.model_s = 0.0  # the model's recent seconds per batch (its thread only)
        self.shadow_credit = 0.0  # its shadow's sample: a frame is handed over each time this reaches 1


class Pipeline:
    """Owns the frame board, the batcher, the inference thread, the post-processing pool and the hand-off."""

    def __init__(
        self,
        context: InferenceContext,
        metrics: Metrics,
        sink: InspectionSink,
        workers: int,
        observer: Observer | None = None,
        parts: PartSink | None = None,
        late: Callable[[Inspection, PartResult], None] = lambda insp, result: None,
        shadow_dir: Path | None = None,
    ):
        """`observer(frame, score, cam_logits, options)`: each inferred frame, on the inference thread, before its
        post-processing (the live view keeps a reference; it must return at once). `parts(result, model)`: every
        part's one verdict (part mode), in order per camera; `late(inspection, result)`: the model's verdict on a
        part that was already not_inspected (it is never published as a verdict)."""
        self.metrics = metrics
        self._parts_sink = parts if parts is not None else (lambda result, model: None)
        self.parts = PartLedger(decided=self._part_decided, where=self._part_expired, late=late)
        self._deadlines = threading.Thread(target=self._watch_deadlines, name="deadlines", daemon=True)
        self._observer = observer
        self.board = FrameBoard(on_drop=self._count_drop)
        self.batcher = Batcher(self.board)
        self._context = context
        self._sink = sink
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="postprocess")
        # Bounded hand-off to post-processing: when it falls behind, inference waits, and the
        # cameras' slots turn stale (counted) instead of a queue growing.
        self._handoff = threading.BoundedSemaphore(4 * workers)
        self._postprocessing = 0  # frames handed to post-processing and not delivered yet (a shadow waits for 0)
        self._postprocessing_lock = threading.Lock()
        self._stop = threading.Event()
        self._lanes: dict[str, _Lane] = {}  # model id -> its inference thread (a removed model's until it ended)
        self._lanes_lock = threading.Lock()
        self._shadows: dict[tuple[str, str, str, str], Shadow] = {}  # (model, shadow, their sha256s) -> its thread
        self._shadow_dir = shadow_dir  # [archive] dir: where shadows keep their measurements and disagreements
        self._freeze_file = os.environ.get(FREEZE_ENV)
        # Per camera, the post-processing jobs in capture order: delivered from the front when done.
        self._order: dict[str, deque[tuple[Future, Frame, InferenceContext, dict]]] = defaultdict(deque)
        self._trackers: dict[str, EpisodeTracker] = {}
        self._episode_counts: dict[str, int] = {}  # per camera for the whole run: numbers never repeat
        self._deliver_lock = threading.Lock()  # one delivery at a time: trackers and order queues
        self.last_defect = "none"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._sync_lanes(self._context)
        self._deadlines.start()

    def stop(self, timeout: float) -> None:
        """Drop what still waits (`shutdown`), finish the batch in flight, then post-processing; a part still
        without a verdict then (its batch outlived the timeout) is not_inspected (`shutdown`)."""
        self._stop.set()
        self.board.close()  # also wakes the inference thread if it waits for frames
        deadline = time.monotonic() + timeout
        for lane in self._all_lanes():
            lane.thread.join(max(0.0, deadline - time.monotonic()))
            if lane.thread.is_alive():
                log.error("model %s: the batch in flight did not finish within %.0f s", lane.model, timeout)
        shadows, self._shadows = list(self._shadows.values()), {}
        for shadow in shadows:
            shadow.stop(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=True)
        with self._deliver_lock:  # every frame delivered: cut the episodes still open
            for tracker in self._trackers.values():
                self._publish_episode(tracker.close("shutdown"), self._context.run_for(tracker.camera).model)
        self.parts.wake()
        self._deadlines.join(timeout)
        self.parts.close("shutdown")

    @property
    def alive(self) -> bool:
        """Every model's inference thread runs (but those of models a reload removed, which end)."""
        return all(lane.thread.is_alive() for lane in self._all_lanes() if not lane.retired.is_set())

    @property
    def busy_since(self) -> float | None:
        """Since when the longest model call still running began (None: none is in the model): a hung inference."""
        return min((t for lane in self._all_lanes() if (t := lane.busy_since) is not None), default=None)

    @property
    def heartbeat_mono(self) -> float:
        """The oldest loop heartbeat of the inference threads (each beats at least every 0.2 s while it loops)."""
        return min((lane.heartbeat_mono for lane in self._all_lanes() if not lane.retired.is_set()), default=time.monotonic())

    # -- what the daemon calls -----------------------------------------------------------------
    def put(self, frame: Frame) -> None:
        """A camera's new frame (from its capture thread): replaces the one waiting, or queues behind it if it is
        a part (part mode); never blocks."""
        if frame.part is not None:
            self.parts.admit(frame)
        self.board.put(frame)
        for shadow in self._shadows.values():  # production needs the cores: a shadow's call in flight ends
            shadow.interrupt.set()

    def lost(self, frame: Frame, reason: DropReason) -> None:
        """A part whose image never became a frame (`inspectd.frames.lost_frame`): not_inspected now. The
        capture thread counted it captured and dropped."""
        self.parts.fail(frame, _part_reason(reason))

    def set_part_mode(self, camera: str, part_queue: int, not_inspected: str) -> None:
        """A camera in part mode: its queue's size and what the line does with its not_inspected parts."""
        self.board.set_part_queue(camera, part_queue)
        self.parts.configure(camera, not_inspected)
        for reason in REASONS:  # every reason's series from 0: increase() and the alert see the first one
            self.metrics.parts_not_inspected.labels(camera=camera, reason=reason)
        for verdict in Verdict:
            self.metrics.parts.labels(camera=camera, verdict=verdict.value)

    @property
    def context(self) -> InferenceContext:
        return self._context

    def swap(self, context: InferenceContext) -> None:
        """Use `context` from the next batch on; the batch in flight finishes with the old one. A model new in it
        gets its inference thread; a model no longer in it has its thread end after its batch in flight."""
        self._context = context  # one assignment: each inference thread reads it once per batch
        self._sync_lanes(context)

    def _sync_lanes(self, context: InferenceContext) -> None:
        """An inference thread per model cameras' frames go to, a shadow thread per shadow model."""
        with self._lanes_lock:
            for model, lane in list(self._lanes.items()):
                if model not in context.production:
                    lane.retired.set()
                    if not lane.thread.is_alive():
                        del self._lanes[model]
            for model in context.production:
                old = self._lanes.get(model)
                if old is not None and not old.retired.is_set():
                    continue
                if old is not None:  # removed and added back (two reloads) while its last batch ran
                    old.thread.join(_RETIRE_WAIT_S)  # the same engine must not be called by two threads at once
                    if old.thread.is_alive():
                        log.error("model %s: its retired thread is still in a model call; a second one starts", model)
                self._lanes[model] = lane = _Lane(model, self._run)
                if not self._stop.is_set():
                    lane.thread.start()
        self._sync_shadows(context)

    def _sync_shadows(self, context: InferenceContext) -> None:
        """Stop the shadows no longer in `context`, then start the new ones (a model file changed: a new one,
        measured afresh). Called by the thread that swaps contexts only; `_shadows` is replaced, never changed in
        place, because capture threads read it (`put`)."""
        wanted = {
            (model, shadow, context.runs[model].deployable.sha256, context.runs[shadow].deployable.sha256)
            for model, shadow in context.shadows.items()
        }
        kept = {key: shadow for key, shadow in self._shadows.items() if key in wanted}
        stopped = [shadow for key, shadow in self._shadows.items() if key not in wanted]
        self._shadows = kept
        for shadow in stopped:  # first: a new shadow of the same ids registers the same metric series
            shadow.stop(timeout=_RETIRE_WAIT_S)
        started = dict(kept)
        for key in wanted - set(kept):
            model, shadow_id, model_sha, shadow_sha = key
            store = ShadowStore(store_dir(self._shadow_dir, *key)) if self._shadow_dir is not None else None
            meta = {"production_sha256": model_sha, "shadow_sha256": shadow_sha}
            started[key] = Shadow(model, shadow_id, self.metrics, store, self.production_idle, meta=meta)
            if not self._stop.is_set():
                started[key].start()
        self._shadows = started

    def _all_lanes(self) -> list[_Lane]:
        with self._lanes_lock:
            return list(self._lanes.values())

    def remove_camera(self, camera: str, reason: str = "camera_stopped") -> None:
        """Drop a stopped camera's waiting frame (`shutdown`) and its place in the round robin; end its
        episode (`reason`: camera_stopped, or shutdown when the daemon stops)."""
        self.board.drop(camera)
        self.batcher.forget(camera)
        with self._deliver_lock:
            tracker = self._trackers.pop(camera, None)
            if tracker is not None:
                self._episode_counts[camera] = tracker.count
                self._publish_episode(tracker.close(reason), self._context.run_for(camera).model)
            if not self._order.get(camera):
                self._order.pop(camera, None)

    def tick(self, now: float | None = None) -> None:
        """End the episodes of cameras that went quiet: nothing of theirs waiting, in the model or in
        post-processing, and their last frame in the episode older than end_s (by the clock). A camera
        with frames on the way is never expired by the clock: its own frames decide, however late."""
        now = time.time() if now is None else now
        context = self._context
        busy = self.in_flight()
        with self._deliver_lock:
            for camera, tracker in self._trackers.items():
                if not busy.get(camera) and not self._order.get(camera):
                    self._publish_episode(
                        tracker.expire(now, context.options_for(camera).episodes), context.run_for(camera).model
                    )

    def in_flight(self) -> dict[str, int]:
        """Frames per camera neither inferred nor dropped yet: waiting on the board or inside the model call.

        Exact once stopped (then empty); a live snapshot may miss a frame that is being handed from
        the board to the model call."""
        counts = Counter(self.board.waiting())
        for lane in self._all_lanes():
            running = lane.running
            counts.update(f.camera for f in (running.frames if running is not None else ()))
        return dict(counts)

    # -- the inference threads (a lane per model) --------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        name_this_thread(lane.thread.name)
        while not self._stop.is_set() and not lane.retired.is_set():
            lane.heartbeat_mono = time.monotonic()
            context = self._context  # read once: the batch is formed for, and run with, this context
            if lane.model not in context.runs:
                break  # removed by a reload (retired is set right after the swap)
            batch = self.batcher.next_batch(lane.model, context.model_of, context.limit(lane.model), context.max_wait_s)
            if batch is not None:
                batch = self._without_hopeless_parts(batch, lane)
            if batch is not None:
                self._run_batch(batch, context.runs[lane.model], context, lane)

    def _without_hopeless_parts(self, batch: Batch, lane: _Lane) -> Batch | None:
        """Parts whose deadline passes before the model could finish them (its recent time per batch) are not
        started: not_inspected (`deadline`) now, and the model's time goes to parts that can still make it.
        Measured on an overloaded line, these were 43 % of the model's work (docs/parts.md)."""
        if not lane.model_s:
            return batch
        now = time.monotonic()
        hopeless = [f for f in batch.frames if f.part is not None and f.part.deadline_mono < now + lane.model_s]
        for frame in hopeless:
            self.metrics.frames_dropped.labels(camera=frame.camera, reason=DropReason.DEADLINE.value).inc()
            self.parts.fail(frame, "deadline")
        if not hopeless:
            return batch
        kept = tuple(f for f in batch.frames if f not in hopeless)
        return Batch(kept) if kept else None

    def _run_batch(self, batch: Batch, run: ModelRun, context: InferenceContext, lane: _Lane) -> None:
        lane.running, lane.busy_since = batch, time.monotonic()
        try:
            scores, cams = self._infer(batch, run, lane)
        except Exception:
            log.exception("inference failed for a batch of %d frame(s); continuing", len(batch.frames))
            for frame in batch.frames:
                self._count_drop(frame, DropReason.ERROR)
            return
        finally:
            lane.running, lane.busy_since = None, None
        for frame, score, cam in zip(batch.frames, scores, cams):
            options = context.options_for(frame.camera)
            if self._observer is not None:
                self._observer(frame, float(score), cam, options)
            self._handoff.acquire()
            self._count_postprocessing(+1)
            try:
                future = self._pool.submit(inspect, frame, float(score), cam, options)
            except RuntimeError:  # the pool was shut down: a batch that outlived stop()'s timeout
                self._count_postprocessing(-1)
                self._handoff.release()
                log.error("camera %s frame %d inferred after shutdown; not published", frame.camera, frame.seq)
                continue
            with self._deliver_lock:
                self._order[frame.camera].append((future, frame, context, run.model))
            future.add_done_callback(functools.partial(self._drain_done, frame.camera))
        try:  # after post-processing was handed the batch: the shadow waits for production to be idle
            self._to_shadow(batch, scores, cams, run, context, lane)
        except Exception:
            log.exception("model %s: handing a batch to its shadow failed", run.id)

    def _to_shadow(self, batch: Batch, scores, cams, run: ModelRun, context: InferenceContext, lane: _Lane) -> None:
        """Hand the shadow of this batch's model (if it has one) its sample of the batch: a reference, never a wait."""
        shadow_id = context.shadows.get(run.id)
        if shadow_id is None:
            return
        shadow_run = context.runs[shadow_id]
        shadow = self._shadows.get((run.id, shadow_id, run.deployable.sha256, shadow_run.deployable.sha256))
        if shadow is None:
            return  # the context changed since this batch began: the next one finds it
        picked = []
        for i in range(len(batch.frames)):  # exactly `sample` of the frames, evenly: a credit that fills up
            lane.shadow_credit += context.sample.get(shadow_id, 1.0)
            if lane.shadow_credit >= 1.0:
                lane.shadow_credit -= 1.0
                picked.append(i)
        if picked:
            frames = tuple(batch.frames[i] for i in picked)
            shadow.offer(
                ShadowJob(
                    frames,
                    tuple(float(scores[i]) for i in picked),
                    tuple(cams[i] for i in picked),
                    tuple(context.options_for(f.camera) for f in frames),
                    run,
                    shadow_run,
                    context.options[shadow_id],
                )
            )

    def _infer(self, batch: Batch, run: ModelRun, lane: _Lane):
        t0 = time.monotonic()
        while self._freeze_file and os.path.exists(self._freeze_file):
            time.sleep(0.1)  # test-only hook (FREEZE_ENV): a hung inference call
        scores, cams = run.engine.infer([f.image for f in batch.frames])
        took = time.monotonic() - t0
        # The model's recent time per batch (a moving average over about 10 batches), for the parts' deadlines.
        lane.model_s = took if not lane.model_s else 0.9 * lane.model_s + 0.1 * took
        m = self.metrics
        m.inference_seconds.labels(model=run.id).observe(took)
        m.batch_size.labels(model=run.id).observe(len(batch.frames))
        for frame, score in zip(batch.frames, scores):
            m.frames_inferred.labels(camera=frame.camera).inc()
            m.score.labels(camera=frame.camera).observe(float(score))
        return scores, cams

    # -- post-processing threads -----------------------------------------------------------------
    def _drain_done(self, camera: str, _future: Future) -> None:
        """A camera's inspection is done (a future's callback): deliver what is ready."""
        self._drain(camera)

    def _drain(self, camera: str) -> None:
        """Deliver this camera's finished inspections from the front of its queue, in capture order."""
        with self._deliver_lock:
            pending = self._order[camera]
            while pending and pending[0][0].done():
                self._deliver(*pending.popleft())

    def _deliver(self, future: Future, frame: Frame, context: InferenceContext, model: dict) -> None:
        """One inspection out, in its camera's order: the part's verdict, the episode step, the publisher. `model`:
        the one whose engine inferred it ({"id", "name", "sha256"})."""
        try:
            try:
                insp: Inspection = future.result()
            except Exception:
                if frame.part is not None:
                    self.parts.fail(frame, "error")
                raise
            if frame.part is not None:
                self.parts.verdict(insp)  # first: the line waits for it
            opts = context.options_for(frame.camera)
            camera = insp.frame.camera
            if camera not in self._trackers:
                self._trackers[camera] = EpisodeTracker(camera, self._episode_counts.get(camera, 0))
            step = self._trackers[camera].observe(insp, opts.episodes, opts.episode_mode)
            self._publish_episode(step.ended, model)
            insp = step.inspection
            self._sink.publish_inspection(insp, model, results=opts.results, defect_event=step.mode == "frames")
            if insp.is_defect:
                self.metrics.defects.labels(camera=frame.camera).inc()
                self.last_defect = f"{frame.camera} #{frame.seq} score {insp.score:.2f}"
            self.metrics.end_to_end_seconds.labels(camera=frame.camera).observe(time.monotonic() - frame.captured_mono)
        except Exception:
            log.exception("post-processing failed")
        finally:
            self._count_postprocessing(-1)
            self._handoff.release()

    def _count_postprocessing(self, change: int) -> None:
        with self._postprocessing_lock:
            self._postprocessing += change

    def production_idle(self) -> bool:
        """Nothing of production's in progress: no frame waiting, no model call, nothing in post-processing (when a
        shadow may take the cores)."""
        with self._postprocessing_lock:
            postprocessing = self._postprocessing
        return not postprocessing and not self.board.cameras() and all(lane.running is None for lane in self._all_lanes())

    def _publish_episode(self, episode: Episode | None, model: dict) -> None:
        if episode is not None:
            self._sink.publish_episode(episode, model, best_event=episode.mode == "episode")
            self.metrics.episodes.labels(camera=episode.camera, end=episode.end_reason).inc()

    def _count_drop(self, frame: Frame, reason: DropReason) -> None:
        self.metrics.frames_dropped.labels(camera=frame.camera, reason=reason.value).inc()
        if frame.part is not None:
            self.parts.fail(frame, _part_reason(reason))

    # -- parts (part mode) -----------------------------------------------------------------------
    def _watch_deadlines(self) -> None:
        """The deadline thread: a part whose deadline passes gets not_inspected then, wherever it is."""
        name_this_thread("deadlines")
        while not self._stop.is_set():
            self.parts.wait(_DEADLINE_TICK_S)
            self.parts.expire(time.monotonic())

    def _part_expired(self, frame: Frame) -> str:
        """A part's deadline passed (under the ledger's lock): off the board if it waits there."""
        if not self.board.discard(frame):
            return "late"  # in the model call or in post-processing: its verdict will come too late
        self.metrics.frames_dropped.labels(camera=frame.camera, reason=DropReason.DEADLINE.value).inc()
        return "deadline"

    def _part_decided(self, result: PartResult) -> None:
        """Every part's one verdict (under the ledger's lock, in order): counted, then handed on."""
        m = self.metrics
        m.parts.labels(camera=result.camera, verdict=result.verdict.value).inc()
        if result.verdict is Verdict.NOT_INSPECTED:
            m.parts_not_inspected.labels(camera=result.camera, reason=result.reason).inc()
        m.part_latency_seconds.labels(camera=result.camera).observe(result.latency_s)
        try:
            self._parts_sink(result, self._context.run_for(result.camera).model)
        except Exception:
            log.exception("camera %s: handing on part %s's verdict failed", result.camera, result.part_id)
