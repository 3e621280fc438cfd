"""Latest-frame slots and the cross-camera batcher: bounded latency, round robin, no starvation."""

from __future__ import annotations

import threading
import time

import numpy as np

from inspectd.batching import Batcher, FrameBoard, buckets_for
from inspectd.frames import Frame


def _frame(cam: str, seq: int) -> Frame:
    return Frame(cam, seq, time.time(), time.monotonic(), np.zeros((4, 4, 3), np.uint8))


def test_buckets():
    assert buckets_for(1) == (1,)
    assert buckets_for(8) == (1, 2, 4, 8)
    assert buckets_for(6) == (1, 2, 4, 6)


def test_slot_keeps_latest_and_counts_stale():
    stale = []
    board = FrameBoard(on_stale=stale.append)
    for i in range(1, 6):
        board.put(_frame("a", i))
    assert [f.seq for f in board.take(["a"], 4)] == [5]
    assert [f.seq for f in stale] == [1, 2, 3, 4]
    assert board.take(["a"], 4) == []


def test_round_robin_no_starvation():
    """With max_batch 2 and 5 always-ready cameras, every camera is served every 3 batches."""
    board = FrameBoard()
    batcher = Batcher(board, max_batch=2, max_wait_ms=0, process=lambda b: None)
    served = []
    seq = 0
    for _ in range(30):
        for cam in "abcde":
            seq += 1
            board.put(_frame(cam, seq))
        served.append([f.camera for f in batcher.next_batch().frames])
    flat = [c for batch in served for c in batch]
    counts = {c: flat.count(c) for c in "abcde"}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    for i in range(len(flat) - 5):  # any window of 5 consecutive picks covers all cameras
        assert set(flat[i:i + 5]) == set("abcde"), flat[i:i + 5]


def test_waits_at_most_max_wait_for_more_frames():
    board = FrameBoard()
    batcher = Batcher(board, max_batch=4, max_wait_ms=50, process=lambda b: None)
    board.put(_frame("a", 1))
    board.put(_frame("b", 2))
    assert len(batcher.next_batch().frames) == 2  # the batcher now knows two cameras
    board.put(_frame("a", 3))  # b is late: wait for it, but no longer than max_wait
    t0 = time.monotonic()
    batch = batcher.next_batch()
    waited = time.monotonic() - t0
    assert [f.camera for f in batch.frames] == ["a"]
    assert 0.04 <= waited < 0.5


def test_does_not_wait_for_more_cameras_than_there_are():
    """Two cameras and max_batch 8: once both have a frame, the batch goes without waiting max_wait."""
    board = FrameBoard()
    batcher = Batcher(board, max_batch=8, max_wait_ms=5000, process=lambda b: None)
    board.put(_frame("a", 1))
    board.put(_frame("b", 2))
    t0 = time.monotonic()
    assert len(batcher.next_batch().frames) == 2
    assert time.monotonic() - t0 < 1.0


def test_full_batch_does_not_wait():
    board = FrameBoard()
    batcher = Batcher(board, max_batch=2, max_wait_ms=5000, process=lambda b: None)
    board.put(_frame("a", 1))
    board.put(_frame("b", 2))
    t0 = time.monotonic()
    assert len(batcher.next_batch().frames) == 2
    assert time.monotonic() - t0 < 1.0


def test_thread_processes_and_stops_after_batch_in_flight():
    board = FrameBoard()
    started, release, done = threading.Event(), threading.Event(), []

    def slow(batch):
        started.set()
        release.wait(5)
        done.append(batch)

    batcher = Batcher(board, max_batch=1, max_wait_ms=0, process=slow)
    batcher.start()
    board.put(_frame("a", 1))
    assert started.wait(5)
    batcher.stop()
    assert batcher.busy_since is not None  # a hung call is visible to the watchdog
    release.set()
    assert batcher.join(5)
    assert len(done) == 1 and not batcher.alive


def test_failed_batch_does_not_kill_the_thread():
    board = FrameBoard()
    calls = []

    def flaky(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")

    batcher = Batcher(board, max_batch=1, max_wait_ms=0, process=flaky)
    batcher.start()
    board.put(_frame("a", 1))
    deadline = time.monotonic() + 5
    while len(calls) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    board.put(_frame("a", 2))
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    batcher.join(5)
    assert len(calls) == 2
