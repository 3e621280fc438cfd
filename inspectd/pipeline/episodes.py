"""Defect episodes: one defect that stays under a camera for many frames is one episode, not N events.

    tracker = EpisodeTracker("line1-top")
    step = tracker.observe(inspection, rules)      # frames of one camera, in capture order
    step.episode                                   # the episode this frame belongs to (None: outside one)
    step.ended                                     # an Episode that ended before this frame (or None)
    tracker.expire(time.time(), rules)             # an episode whose camera went quiet ends by time too

A pure state machine with hysteresis, per camera:
- idle -> active when a frame's score reaches the threshold (`is_defect`): episode n+1 starts with it;
- active: a frame at or above the lower `exit_threshold` belongs to the episode (and resets the count);
  below it, the frame is outside and counts towards the end;
- active -> idle after `end_frames` consecutive frames below `exit_threshold`, or when `end_s`
  seconds have passed since the episode's last frame at or above it (by frame capture time; with
  `expire`, by the clock, for a camera that stopped delivering).
The episode keeps its best frame (the highest score) with its masks, for the summary.
"""

from __future__ import annotations

__all__ = ["EpisodeRules", "Episode", "Step", "EpisodeTracker"]

from dataclasses import dataclass, field, replace

from inspectd.frames import Inspection


@dataclass(frozen=True)
class EpisodeRules:
    """From [episodes]: the exit threshold (below the image threshold) and the two end conditions."""

    exit_threshold: float
    end_frames: int = 3
    end_s: float = 1.0


@dataclass(frozen=True, eq=False)
class Episode:
    """A finished (or, at shutdown, cut) defect episode of one camera."""

    camera: str
    number: int  # per camera and run, from 1
    first: Inspection  # the frame that started it
    last: Inspection  # its last frame at or above the exit threshold
    best: Inspection  # its highest score
    frames: int  # frames in it (from first to last, those at or above the exit threshold)
    defect_frames: int  # of those, frames judged defective
    end_reason: str  # frames | time | shutdown | camera_stopped
    mode: str = "frames"  # the [episodes] mode when it started: it keeps it to the end (a reload cannot split it)

    @property
    def duration_s(self) -> float:
        return self.last.frame.captured_at - self.first.frame.captured_at


@dataclass(frozen=True)
class Step:
    inspection: Inspection  # the observed frame, with `episode` set when it belongs to one
    mode: str  # the mode this frame is published in: its episode's, else the one in force
    started: bool = False  # the frame started an episode
    ended: Episode | None = None  # an episode that ended at this frame (the frame is outside it)

    @property
    def episode(self) -> int | None:
        return self.inspection.episode


@dataclass
class _Active:
    number: int
    first: Inspection
    last: Inspection
    best: Inspection
    mode: str
    frames: int = 1
    defect_frames: int = 1
    below: int = 0  # consecutive frames below the exit threshold since `last`


@dataclass
class EpisodeTracker:
    camera: str
    count: int = 0  # episodes started
    _active: _Active | None = field(default=None, repr=False)

    @property
    def active(self) -> int | None:
        return self._active.number if self._active else None

    def observe(self, insp: Inspection, rules: EpisodeRules, mode: str = "frames") -> Step:
        """One frame of this camera, in capture order; `mode` is the one in force (kept by an episode it starts)."""
        ended = None
        a = self._active
        if a is not None and insp.frame.captured_at - a.last.frame.captured_at > rules.end_s:
            ended = self._end(a, "time")  # the gap since its last frame is longer than end_s
            a = None
        if a is None:
            if not insp.is_defect:
                return Step(insp, mode, ended=ended)
            self.count += 1
            insp = replace(insp, episode=self.count)
            self._active = _Active(self.count, insp, insp, insp, mode)
            return Step(insp, mode, started=True, ended=ended)
        if insp.score >= rules.exit_threshold:
            insp = replace(insp, episode=a.number)
            a.last, a.frames, a.below = insp, a.frames + 1, 0
            a.defect_frames += insp.is_defect
            if insp.score > a.best.score:
                a.best = insp
            return Step(insp, a.mode)
        a.below += 1
        if a.below >= rules.end_frames:
            return Step(insp, mode, ended=self._end(a, "frames"))
        return Step(insp, a.mode)

    def expire(self, now: float, rules: EpisodeRules) -> Episode | None:
        """End the active episode if its last frame at or above the exit threshold is older than end_s."""
        a = self._active
        if a is not None and now - a.last.frame.captured_at > rules.end_s:
            return self._end(a, "time")
        return None

    def close(self, reason: str) -> Episode | None:
        """End the active episode now (shutdown, camera removed)."""
        a = self._active
        return self._end(a, reason) if a is not None else None

    def _end(self, a: _Active, reason: str) -> Episode:
        """End `a`, the active episode."""
        self._active = None
        return Episode(self.camera, a.number, a.first, a.last, a.best, a.frames, a.defect_frames, reason, a.mode)
