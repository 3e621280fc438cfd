"""Defect episodes: the per-camera state machine as tables, the synthetic camera's `dwell`, and the
daemon end to end in both modes (synthetic cameras whose defects stay in view for several frames)."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import collect_events

from inspectd.client import Subscriber
from inspectd.config import CameraConfig
from inspectd.frames import Frame, Inspection
from inspectd.pipeline.episodes import EpisodeRules, EpisodeTracker
from inspectd.sources.synthetic import SyntheticSource

RULES = EpisodeRules(exit_threshold=0.4, end_frames=2, end_s=1.0)


def _insp(seq: int, score: float, t: float | None = None) -> Inspection:
    frame = Frame("cam", seq, 1000.0 + (seq * 0.1 if t is None else t), 0.0, np.zeros((4, 4, 3), np.uint8))
    return Inspection(frame, score, 0.5, score >= 0.5)


def _run(scores, rules=RULES, times=None):
    """-> (the episode of each frame, the episodes ended as (number, first seq, last seq, frames, defect
    frames, best seq, reason, at which frame))."""
    tracker, belongs, ended = EpisodeTracker("cam"), [], []
    for i, score in enumerate(scores):
        step = tracker.observe(_insp(i + 1, score, None if times is None else times[i]), rules)
        belongs.append(step.episode)
        if step.ended:
            e = step.ended
            ended.append(
                (e.number, e.first.frame.seq, e.last.frame.seq, e.frames, e.defect_frames, e.best.frame.seq, e.end_reason, i + 1)
            )
    return belongs, ended, tracker


@pytest.mark.parametrize(
    "scores,belongs,ended",
    [
        # nothing defective: no episode
        ([0.1, 0.45, 0.2], [None, None, None], []),
        # one frame, then two below the exit threshold: ends at the second ("frames")
        ([0.9, 0.1, 0.1, 0.1], [1, None, None, None], [(1, 1, 1, 1, 1, 1, "frames", 3)]),
        # hysteresis: 0.45 is below the threshold but above the exit: the episode goes on
        ([0.6, 0.45, 0.8, 0.45, 0.3, 0.2], [1, 1, 1, 1, None, None], [(1, 1, 4, 4, 2, 3, "frames", 6)]),
        # one frame below the exit then back: still one episode (end_frames 2)
        ([0.7, 0.2, 0.9, 0.1, 0.1], [1, None, 1, None, None], [(1, 1, 3, 2, 2, 3, "frames", 5)]),
        # two episodes
        (
            [0.9, 0.1, 0.1, 0.8, 0.1, 0.1],
            [1, None, None, 2, None, None],
            [(1, 1, 1, 1, 1, 1, "frames", 3), (2, 4, 4, 1, 1, 4, "frames", 6)],
        ),
        # a score between exit and threshold never starts one
        ([0.45, 0.45, 0.9], [None, None, 1], []),
    ],
)
def test_episode_table(scores, belongs, ended):
    got_belongs, got_ended, _ = _run(scores)
    assert got_belongs == belongs
    assert got_ended == ended


def test_an_episode_ends_by_time_between_frames_and_by_the_clock():
    # frames 1 and 2 are 3 s apart (> end_s): the first episode ends by time when frame 2 arrives, which starts the next
    belongs, ended, tracker = _run([0.9, 0.9], times=[0.0, 3.0])
    assert belongs == [1, 2] and ended == [(1, 1, 1, 1, 1, 1, "time", 2)]
    assert tracker.expire(1000.0 + 3.5, RULES) is None  # 0.5 s after its last frame: still open
    quiet = tracker.expire(1000.0 + 4.5, RULES)  # the camera went quiet
    assert (quiet.number, quiet.end_reason) == (2, "time") and tracker.active is None


def test_close_cuts_the_open_episode_and_the_best_frame_is_the_highest_score():
    _, _, tracker = _run([0.6, 0.95, 0.7])
    episode = tracker.close("shutdown")
    assert (episode.best.frame.seq, episode.best.score, episode.frames, episode.end_reason) == (2, 0.95, 3, "shutdown")
    assert episode.best.episode == 1 and tracker.close("shutdown") is None
    assert episode.duration_s == pytest.approx(0.2)


def test_an_episode_keeps_the_mode_it_started_in_and_numbers_go_on():
    tracker = EpisodeTracker("cam", count=5)  # a camera stopped and started again in the same run
    first = tracker.observe(_insp(1, 0.9), RULES, "episode")
    assert first.episode == 6 and first.mode == "episode"
    during = tracker.observe(_insp(2, 0.9), RULES, "frames")  # a reload switched the mode mid-episode
    assert during.mode == "episode"
    tracker.observe(_insp(3, 0.1), RULES, "frames")
    end = tracker.observe(_insp(4, 0.1), RULES, "frames")
    assert end.ended.mode == "episode" and end.mode == "frames" and end.ended.number == 6
    assert tracker.observe(_insp(5, 0.9), RULES, "frames").mode == "frames"  # the next one: the new mode


def test_dwell_keeps_a_part_in_view_for_d_frames():
    src = SyntheticSource(CameraConfig(id="c", url="synthetic://?dwell=3&seed=5&defect_rate=0.5"))
    frames = [src.sample(i) for i in range(9)]
    for block in range(3):
        a, b, c = frames[3 * block : 3 * block + 3]
        assert np.array_equal(a.image, b.image) and np.array_equal(b.image, c.image) and a.defect == c.defect
    assert not np.array_equal(frames[2].image, frames[3].image)


# ------------------------------------------------------------------------------------------ the daemon
CAMERA = "synthetic://?fps=10&width=160&height=128&defect_rate=0.5&seed=11&dwell=6"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frames", "episode"])
def test_the_daemon_reports_episodes(tmp_path, mode):
    config, urls = daemon_config(tmp_path, camera_toml("cam-1", CAMERA), episodes={"mode": mode, "end_frames": 2, "end_s": 2.0})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(urls["metrics"])
        with Subscriber(urls["events"], ["defect.", "episode."]) as sub:
            events = collect_events(
                sub,
                lambda evs: sum(e.topic.startswith("episode.") for e in evs) >= 3,
                ("defect", "episode"),
                timeout=90,
                message=daemon.log,
            )
        assert daemon.terminate() == 0, daemon.log()
    episodes = [e for e in events if e.topic == "episode.cam-1"]
    defects = [e for e in events if e.topic == "defect.cam-1"]
    seqs = [d.header["frame_seq"] for d in defects]
    assert seqs == sorted(seqs)  # a camera's events leave in capture order (post-processing runs in parallel)
    numbers = [e.header["episode"] for e in episodes]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    for ep in episodes[1:]:  # the first may have begun before we subscribed
        h = ep.header
        mine = [d for d in defects if d.header["episode"] == h["episode"]]
        assert h["frames"] >= 1 and h["defect_frames"] >= 1 and h["end_reason"] in ("frames", "time")
        assert h["first_frame_seq"] <= h["best"]["frame_seq"] <= h["last_frame_seq"]
        assert ep.mask is not None and ep.regions_mask is not None  # the best frame's masks
        if mode == "frames":  # every defective frame of it was an event, carrying the episode
            assert len(mine) == h["defect_frames"]
            assert max(d.header["score"] for d in mine) == h["peak_score"]
        else:  # one defect event per episode: its best frame, just before the summary
            assert len(mine) == 1 and mine[0].header["frame_seq"] == h["best"]["frame_seq"]
            assert mine[0].header["score"] == h["peak_score"]
            assert events.index(mine[0]) < events.index(ep)
    if mode == "episode":
        assert all(d.header["episode"] is not None for d in defects)
