"""Part mode (docs/parts.md): every part gets exactly one verdict, on time or not_inspected, in order.

The ledger and the board are tested alone with a clock we drive; the overload test runs the real
pipeline with the real demo model, fed parts much faster than it can infer them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inspectd.config import CameraConfig
from inspectd.frames import DropReason, Frame, Inspection, PartResult, PartTag, Verdict, lost_frame
from inspectd.metrics import Metrics, frame_accounts
from inspectd.pipeline.batching import FrameBoard
from inspectd.pipeline.parts import PartLedger


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def part(camera: str, seq: int, captured: float, deadline_s: float = 0.5, image=None) -> Frame:
    image = np.zeros((8, 8, 3), np.uint8) if image is None else image
    return Frame(camera, seq, 1_700_000_000.0 + captured, captured, image, PartTag(f"{camera}-{seq}", captured + deadline_s))


def make_inspection(frame: Frame, score: float) -> Inspection:
    return Inspection(frame, score, 0.5, score >= 0.5)


def one_verdict_each(put: dict[str, list[str]], results: list[PartResult]) -> list[str]:
    """What breaks the promise: a part without a verdict, with two, or a camera's verdicts out of part order."""
    problems = []
    by_camera: dict[str, list[str]] = defaultdict(list)
    for r in results:
        by_camera[r.camera].append(r.part_id)
    for camera, ids in put.items():
        got = by_camera.get(camera, [])
        counts = Counter(got)
        problems += [f"{camera}/{i}: no verdict" for i in ids if counts[i] == 0]
        problems += [f"{camera}/{i}: {n} verdicts" for i, n in counts.items() if n > 1]
        if list(dict.fromkeys(got)) != [i for i in ids if i in counts]:
            problems.append(f"{camera}: verdicts out of part order")
    return problems


# -- the ledger ----------------------------------------------------------------------------------------


def test_the_first_decision_wins_and_a_late_verdict_is_only_recorded():
    clock, results, late = Clock(), [], []
    ledger = PartLedger(results.append, late=lambda insp, r: late.append((insp.score, r.part_id)), clock=clock)
    frame = part("a", 1, clock.now)
    ledger.admit(frame)
    clock.now += 0.6  # past its 0.5 s deadline, inside the model
    assert ledger.expire(clock.now) == 1
    ledger.verdict(make_inspection(frame, score=0.9))  # the model answers after the deadline
    ledger.fail(frame, "error")  # and a failure afterwards changes nothing
    assert [(r.verdict, r.reason, r.action) for r in results] == [(Verdict.NOT_INSPECTED, "late", "reject")]
    assert late == [(0.9, "a-1")]
    assert results[0].latency_s == pytest.approx(0.6)
    assert ledger.open_parts() == {}


def test_a_verdict_expires_overdue_parts_first_so_verdicts_stay_in_order():
    """Part 1's deadline passed unnoticed (the deadline thread was late); part 2's verdict arrives: part 1's
    not_inspected goes out before it."""
    clock, results = Clock(), []
    ledger = PartLedger(results.append, clock=clock)
    first, second = part("a", 1, clock.now, deadline_s=0.1), part("a", 2, clock.now + 0.05, deadline_s=0.5)
    ledger.admit(first)
    ledger.admit(second)
    clock.now += 0.2
    ledger.verdict(make_inspection(second, score=0.1))
    assert [(r.part_id, r.verdict) for r in results] == [("a-1", Verdict.NOT_INSPECTED), ("a-2", Verdict.OK)]


def test_the_action_of_not_inspected_parts_is_per_camera_and_lost_parts_get_a_verdict():
    clock, results = Clock(), []
    ledger = PartLedger(results.append, clock=clock)
    ledger.configure("a", "accept")
    ledger.admit(part("a", 1, clock.now))
    ledger.expire(clock.now + 1)
    lost = lost_frame("b", 7, PartTag("b-7", clock.now + 0.5), 1.0, clock.now)  # undecodable: never admitted
    ledger.fail(lost, "decode")
    assert [(r.part_id, r.action, r.reason) for r in results] == [("a-1", "accept", "late"), ("b-7", "reject", "decode")]


def test_where_takes_a_waiting_part_off_the_board():
    clock, results = Clock(), []
    board = FrameBoard()
    ledger = PartLedger(results.append, where=lambda frame: "deadline" if board.discard(frame) else "late", clock=clock)
    frames = [part("a", seq, clock.now) for seq in (1, 2)]
    for frame in frames:
        ledger.admit(frame)
        board.put(frame)
    assert board.take(["a"], 1) == [frames[0]]  # part 1 goes to the model, part 2 waits
    ledger.expire(clock.now + 1)
    assert [r.reason for r in results] == ["late", "deadline"]
    assert board.waiting() == {}


# -- the board -----------------------------------------------------------------------------------------


def test_a_part_queue_keeps_every_part_in_order_and_refuses_beyond_its_size():
    drops = []
    board = FrameBoard(on_drop=lambda frame, reason: drops.append((frame.seq, reason)))
    board.set_part_queue("a", 3)
    frames = [part("a", seq, 0.0) for seq in range(1, 6)]
    for frame in frames:
        board.put(frame)
    assert drops == [(4, DropReason.QUEUE_FULL), (5, DropReason.QUEUE_FULL)]  # the waiting ones are nearer their verdict
    board.put(Frame("s", 1, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8)))  # a stream camera beside it
    board.put(Frame("s", 2, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8)))
    assert drops[-1] == (1, DropReason.STALE)
    taken = board.take(["a", "s"], 3)
    assert [(f.camera, f.seq) for f in taken] == [("a", 1), ("s", 2), ("a", 2)]  # one per camera per round
    assert board.waiting() == {"a": 1}


# -- the pipeline under overload, with the real model ----------------------------------------------------


@pytest.mark.slow
def test_under_overload_every_part_gets_exactly_one_verdict_in_order(tf):
    """Three part cameras put parts as fast as they can (bursts far beyond the model's speed, a short
    deadline, small queues): every part ends with exactly one verdict, in part order per camera, some
    inspected and some not_inspected for each reason overload gives; frames and parts both balance."""
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline.context import InferenceContext
    from inspectd.pipeline.core import Pipeline
    from inspectd.pipeline.engine import InferenceEngine
    from inspectd.pipeline.postprocess import InspectOptions

    demo = load_model(resolve_model_path("builtin:demo"))
    engine = InferenceEngine(demo, (1, 2, 4))
    engine.warmup((96, 64))
    context = InferenceContext.single(engine, InspectOptions(threshold=0.5), demo, max_wait_s=0.002)
    registry = CollectorRegistry()
    results: list[PartResult] = []
    lock = threading.Lock()

    def decided(result: PartResult, model: dict) -> None:
        with lock:
            results.append(result)

    class Sink:
        def publish_inspection(self, insp, model, results=False, defect_event=True): ...

        def publish_episode(self, episode, model, best_event): ...

    pipeline = Pipeline(context, Metrics(registry), Sink(), workers=2, parts=decided)
    for camera in ("a", "b", "c"):
        pipeline.set_part_mode(camera, part_queue=4, not_inspected="reject")
    pipeline.start()
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    put: dict[str, list[str]] = defaultdict(list)
    metrics = pipeline.metrics
    try:
        for burst in range(30):
            for seq in range(burst * 10 + 1, burst * 10 + 11):
                for camera in ("a", "b", "c"):
                    now = time.monotonic()
                    frame = Frame(camera, seq, time.time(), now, image, PartTag(f"{camera}-{seq}", now + 0.08))
                    metrics.frames_captured.labels(camera=camera).inc()  # as the capture thread does
                    put[camera].append(frame.part.part_id)  # type: ignore[union-attr]
                    pipeline.put(frame)
            time.sleep(0.03)  # bursts, then a breath: the model runs meanwhile (pacing, not an assertion)
    finally:
        pipeline.stop(timeout=30)
    assert one_verdict_each(put, results) == []
    verdicts = Counter(r.verdict for r in results)
    reasons = Counter(r.reason for r in results if r.verdict is Verdict.NOT_INSPECTED)
    assert verdicts[Verdict.OK] + verdicts[Verdict.DEFECT] > 0 and verdicts[Verdict.NOT_INSPECTED] > 0, verdicts
    assert reasons["queue_full"] > 0, reasons
    assert all(r.action == "reject" for r in results if r.verdict is Verdict.NOT_INSPECTED)
    for account in frame_accounts(registry, pipeline.in_flight()):
        assert account.residual == 0 and account.in_flight == 0, str(account)
        parts = metrics.parts.total(camera=account.camera)
        assert parts == account.captured == len(put[account.camera]), (parts, str(account))
    assert pipeline.parts.open_parts() == {}


def test_the_overload_check_sees_a_part_without_a_verdict():
    """`one_verdict_each` can fail: a missing, a doubled and a reordered verdict are each seen."""

    def result(pid: str) -> PartResult:
        return PartResult("a", pid, 1, Verdict.OK, "accept", "", 0.0, 0.0, 0.0)

    put = {"a": ["1", "2", "3"]}
    assert one_verdict_each(put, [result("1"), result("2"), result("3")]) == []
    assert one_verdict_each(put, [result("1"), result("3")]) == ["a/2: no verdict"]
    assert one_verdict_each(put, [result("1"), result("2"), result("2"), result("3")]) == ["a/2: 2 verdicts"]
    assert one_verdict_each(put, [result("2"), result("1"), result("3")]) == ["a: verdicts out of part order"]


# -- configuration ----------------------------------------------------------------------------------------


def test_part_settings_belong_to_part_mode():
    with pytest.raises(ValueError, match="deadline_ms apply to mode"):
        CameraConfig(id="a", url="synthetic://", deadline_ms=200)
    with pytest.raises(ValueError, match="fps_limit must be 0"):
        CameraConfig(id="a", url="synthetic://", mode="parts", fps_limit=5)
    cfg = CameraConfig(id="a", url="synthetic://", mode="parts", deadline_ms=200, part_queue=2, not_inspected="accept")
    assert (cfg.deadline_ms, cfg.part_queue, cfg.not_inspected) == (200, 2, "accept")


def test_a_part_the_model_cannot_finish_in_time_is_not_started():
    """Batches lose the parts whose deadline passes before the model's recent time per batch is over: those end
    not_inspected (`deadline`) at once, counted as frames dropped; the others are run."""
    from inspectd.frames import Batch
    from inspectd.pipeline.core import Pipeline, _Lane

    results: list[PartResult] = []

    class Sink:
        def publish_inspection(self, insp, model, results=False, defect_event=True): ...

        def publish_episode(self, episode, model, best_event): ...

    class Context:
        def run_for(self, camera):
            return SimpleNamespace(model={"id": "m", "name": "m", "sha256": "0"})

    registry = CollectorRegistry()
    pipeline = Pipeline(Context(), Metrics(registry), Sink(), workers=1, parts=lambda r, model: results.append(r))  # type: ignore[arg-type]
    now = time.monotonic()
    soon, later = part("a", 1, now - 0.95, deadline_s=1.0), part("a", 2, now, deadline_s=1.0)  # 50 ms and 1 s left
    for frame in (soon, later):
        pipeline.parts.admit(frame)
    lane = _Lane("m", lambda lane: None)
    assert pipeline._without_hopeless_parts(Batch((soon, later)), lane).frames == (soon, later)  # no model time yet: all run
    lane.model_s = 0.2
    assert pipeline._without_hopeless_parts(Batch((soon, later)), lane).frames == (later,)
    assert [(r.part_id, r.reason) for r in results] == [("a-1", "deadline")]
    assert pipeline.metrics.frames_dropped.total(reason="deadline") == 1
    assert pipeline._without_hopeless_parts(Batch((soon,)), lane) is None  # nothing left to run
