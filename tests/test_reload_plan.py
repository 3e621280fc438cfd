"""The reload plan: a pure function of (running settings, new settings, model hashes), tested as a table."""

from __future__ import annotations

import pytest

from inspectd.config import Settings
from inspectd.service.reload import CONTEXT_KEYS, ENGINE_KEYS, LIVE_KEYS, RESTART_KEYS, changed_keys, plan_reload

SHA = "a" * 64
CAM_A = {"id": "cam-a", "url": "synthetic://?seed=1"}
CAM_B = {"id": "cam-b", "url": "synthetic://?seed=2"}


def settings(**sections) -> Settings:
    return Settings(**{"cameras": [CAM_A], **sections})


# (name, new settings, new model sha256, expected: load_model, swap_context, applied, needs_restart, cameras)
CASES = [
    ("nothing", settings(), SHA, False, False, (), (), ((), (), ())),
    ("model file rewritten in place", settings(), "b" * 64, True, True, ("model file (new contents)",), (), ((), (), ())),
    ("model path", settings(model={"path": "/m/other.keras"}), "b" * 64, True, True, ("model.path",), (), ((), (), ())),
    ("threshold only", settings(model={"threshold": 0.7}), SHA, False, True, ("model.threshold",), (), ((), (), ())),
    ("precision", settings(model={"precision": "mixed_float16"}), SHA, True, True, ("model.precision",), (), ((), (), ())),
    ("max_batch", settings(batching={"max_batch": 4}), SHA, True, True, ("batching.max_batch",), (), ((), (), ())),
    ("max_wait_ms", settings(batching={"max_wait_ms": 50}), SHA, False, True, ("batching.max_wait_ms",), (), ((), (), ())),
    (
        "results and attach_frame apply at once",
        settings(publish={"results": True, "attach_frame": True}),
        SHA,
        False,
        True,
        ("publish.results", "publish.attach_frame"),
        (),
        ((), (), ()),
    ),
    (
        "endpoint needs a restart",
        settings(publish={"endpoint": "tcp://127.0.0.1:6000"}),
        SHA,
        False,
        False,
        (),
        ("publish.endpoint",),
        ((), (), ()),
    ),
    (
        "stuck_after_s applies live, shutdown timeout waits",
        settings(daemon={"stuck_after_s": 60, "shutdown_timeout_s": 3}),
        SHA,
        False,
        False,
        ("daemon.stuck_after_s",),
        ("daemon.shutdown_timeout_s",),
        ((), (), ()),
    ),
    (
        "metrics port and workers need a restart",
        settings(metrics={"port": 9200}, postprocess={"workers": 4}),
        SHA,
        False,
        False,
        (),
        ("postprocess.workers", "metrics.port"),
        ((), (), ()),
    ),
    (
        "mask_resolution applies, workers wait",
        settings(postprocess={"workers": 4, "mask_resolution": "cam"}),
        SHA,
        False,
        True,
        ("postprocess.mask_resolution",),
        ("postprocess.workers",),
        ((), (), ()),
    ),
    ("camera added", Settings(cameras=[CAM_A, CAM_B]), SHA, False, False, (), (), ((), ("cam-b",), ())),
    ("camera removed", Settings(cameras=[]), SHA, False, False, (), (), (("cam-a",), (), ())),
    ("camera changed", Settings(cameras=[{**CAM_A, "fps_limit": 5}]), SHA, False, False, (), (), ((), (), ("cam-a",))),
    (
        "a camera's threshold and mask rule: the context swaps, the camera keeps running",
        Settings(cameras=[{**CAM_A, "threshold": 0.9, "mask_rule": "relative:0.5"}]),
        SHA,
        False,
        True,
        ("cameras.cam-a.threshold", "cameras.cam-a.mask_rule"),
        (),
        ((), (), ()),
    ),
    (
        "a camera's min_region_px with its url: restarted, and the context swaps",
        Settings(cameras=[{**CAM_A, "url": "synthetic://?seed=9", "min_region_px": 50}]),
        SHA,
        False,
        True,
        ("cameras.cam-a.min_region_px",),
        (),
        ((), (), ("cam-a",)),
    ),
]


@pytest.mark.parametrize(("name", "new", "sha", "load", "swap", "applied", "restart", "cams"), CASES, ids=[c[0] for c in CASES])
def test_plan(name, new, sha, load, swap, applied, restart, cams):
    plan = plan_reload(settings(), new, SHA, sha)
    assert (plan.load_model, plan.swap_context) == (load, swap)
    assert plan.applied == applied
    assert plan.needs_restart == restart
    assert (plan.stop_cameras, tuple(c.id for c in plan.start_cameras), tuple(c.id for c in plan.restart_cameras)) == cams
    assert plan.noop == (not applied and not any(cams))


def test_effective_settings_keep_what_needs_a_restart():
    """The daemon runs with the new values it applied and the old values of what waits for a restart."""
    old = settings(publish={"endpoint": "tcp://127.0.0.1:5556"})
    new = settings(
        publish={"endpoint": "tcp://127.0.0.1:6000", "results": True}, model={"threshold": 0.8}, daemon={"stuck_after_s": 99}
    )
    plan = plan_reload(old, new, SHA, SHA)
    eff = plan.effective
    assert eff.publish.endpoint == "tcp://127.0.0.1:5556"  # still bound to the old one
    assert eff.publish.results is True  # applied at once
    assert eff.daemon.stuck_after_s == 99  # read live: applied
    assert eff.model.threshold == 0.8
    assert plan.needs_restart == ("publish.endpoint",)


def test_describe_says_what_applied_and_what_waits():
    new = Settings(cameras=[CAM_B], model={"threshold": 0.6}, metrics={"port": 9300})
    lines = plan_reload(settings(), new, SHA, SHA).describe()
    assert lines == [
        "applied: model.threshold",
        "cameras added cam-b; removed cam-a",
        "needs a restart to take effect (still running the old values): metrics.port",
    ]
    assert plan_reload(settings(), settings(), SHA, SHA).describe() == ["nothing changed"]


def test_every_key_is_classified_exactly_once():
    """A key added to the config must be placed deliberately: applied (engine, context, live) or restart."""
    groups = [ENGINE_KEYS, CONTEXT_KEYS, LIVE_KEYS, RESTART_KEYS]
    every = [key for group in groups for key in group]
    assert len(every) == len(set(every)), "a key is in two groups"
    base = settings()
    keys = {f"{section}.{key}" for section, values in base.model_dump(exclude={"cameras"}).items() for key in values}
    assert keys == set(every)
    # changed_keys sees a change of any of them (here: a key of each section with a simple type changed)
    assert changed_keys(base, settings(daemon={"warmup": False}, archive={"max_age_s": 5})) == [
        "archive.max_age_s",
        "daemon.warmup",
    ]
