"""The reload plan: a pure function of (running settings, new settings, model hashes), tested as a table."""

from __future__ import annotations

import pytest

from inspectd.config import Settings
from inspectd.service.reload import CONTEXT_KEYS, ENGINE_KEYS, LIVE_KEYS, RESTART_KEYS, changed_keys, plan_reload

SHA = "a" * 64
RUNNING = {"default": SHA}  # the model files' sha256 by model id, of the running daemon
CAM_A = {"id": "cam-a", "url": "synthetic://?seed=1"}
CAM_B = {"id": "cam-b", "url": "synthetic://?seed=2"}


def settings(**sections) -> Settings:
    return Settings(**{"cameras": [CAM_A], **sections})


# (name, new settings, new model sha256, expected: load_models, swap_context, applied, needs_restart, cameras)
Y, N = ("default",), ()  # the one model of [model] loaded again, or not
CASES = [
    ("nothing", settings(), SHA, N, False, (), (), ((), (), ())),
    ("model file rewritten in place", settings(), "b" * 64, Y, True, ("model file (new contents)",), (), ((), (), ())),
    ("model path", settings(model={"path": "/m/other.keras"}), "b" * 64, Y, True, ("model.path",), (), ((), (), ())),
    ("threshold only", settings(model={"threshold": 0.7}), SHA, N, True, ("model.threshold",), (), ((), (), ())),
    ("precision", settings(model={"precision": "mixed_float16"}), SHA, Y, True, ("model.precision",), (), ((), (), ())),
    ("max_batch", settings(batching={"max_batch": 4}), SHA, Y, True, ("batching.max_batch",), (), ((), (), ())),
    ("max_wait_ms", settings(batching={"max_wait_ms": 50}), SHA, N, True, ("batching.max_wait_ms",), (), ((), (), ())),
    (
        "results and attach_frame apply at once",
        settings(publish={"results": True, "attach_frame": True}),
        SHA,
        N,
        True,
        ("publish.results", "publish.attach_frame"),
        (),
        ((), (), ()),
    ),
    (
        "endpoint needs a restart",
        settings(publish={"endpoint": "tcp://127.0.0.1:6000"}),
        SHA,
        N,
        False,
        (),
        ("publish.endpoint",),
        ((), (), ()),
    ),
    (
        "stuck_after_s applies live, shutdown timeout waits",
        settings(daemon={"stuck_after_s": 60, "shutdown_timeout_s": 3}),
        SHA,
        N,
        False,
        ("daemon.stuck_after_s",),
        ("daemon.shutdown_timeout_s",),
        ((), (), ()),
    ),
    (
        "metrics port and workers need a restart",
        settings(metrics={"port": 9200}, postprocess={"workers": 4}),
        SHA,
        N,
        False,
        (),
        ("postprocess.workers", "metrics.port"),
        ((), (), ()),
    ),
    (
        "mask_resolution applies, workers wait",
        settings(postprocess={"workers": 4, "mask_resolution": "cam"}),
        SHA,
        N,
        True,
        ("postprocess.mask_resolution",),
        ("postprocess.workers",),
        ((), (), ()),
    ),
    ("camera added", Settings(cameras=[CAM_A, CAM_B]), SHA, N, True, (), (), ((), ("cam-b",), ())),
    ("camera removed", Settings(cameras=[]), SHA, N, True, (), (), (("cam-a",), (), ())),
    ("camera changed", Settings(cameras=[{**CAM_A, "fps_limit": 5}]), SHA, N, False, (), (), ((), (), ("cam-a",))),
    (
        "a camera's threshold and mask rule: the context swaps, the camera keeps running",
        Settings(cameras=[{**CAM_A, "threshold": 0.9, "mask_rule": "relative:0.5"}]),
        SHA,
        N,
        True,
        ("cameras.cam-a.threshold", "cameras.cam-a.mask_rule"),
        (),
        ((), (), ()),
    ),
    (
        "a camera's min_region_px with its url: restarted, and the context swaps",
        Settings(cameras=[{**CAM_A, "url": "synthetic://?seed=9", "min_region_px": 50}]),
        SHA,
        N,
        True,
        ("cameras.cam-a.min_region_px",),
        (),
        ((), (), ("cam-a",)),
    ),
]


@pytest.mark.parametrize(("name", "new", "sha", "load", "swap", "applied", "restart", "cams"), CASES, ids=[c[0] for c in CASES])
def test_plan(name, new, sha, load, swap, applied, restart, cams):
    plan = plan_reload(settings(), new, RUNNING, {"default": sha})
    assert (plan.load_models, plan.swap_context) == (load, swap)
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
    plan = plan_reload(old, new, RUNNING, RUNNING)
    eff = plan.effective
    assert eff.publish.endpoint == "tcp://127.0.0.1:5556"  # still bound to the old one
    assert eff.publish.results is True  # applied at once
    assert eff.daemon.stuck_after_s == 99  # read live: applied
    assert eff.model.threshold == 0.8
    assert plan.needs_restart == ("publish.endpoint",)


def test_describe_says_what_applied_and_what_waits():
    new = Settings(cameras=[CAM_B], model={"threshold": 0.6}, metrics={"port": 9300})
    lines = plan_reload(settings(), new, RUNNING, RUNNING).describe()
    assert lines == [
        "applied: model.threshold",
        "cameras added cam-b; removed cam-a",
        "needs a restart to take effect (still running the old values): metrics.port",
    ]
    assert plan_reload(settings(), settings(), RUNNING, RUNNING).describe() == ["nothing changed"]


def test_every_key_is_classified_exactly_once():
    """A key added to the config must be placed deliberately: applied (engine, context, live) or restart."""
    groups = [ENGINE_KEYS, CONTEXT_KEYS, LIVE_KEYS, RESTART_KEYS]
    every = [key for group in groups for key in group]
    assert len(every) == len(set(every)), "a key is in two groups"
    base = settings()
    keys = {f"{section}.{key}" for section, values in base.model_dump(exclude={"cameras", "models"}).items() for key in values}
    assert keys == set(every)
    # changed_keys sees a change of any of them (here: a key of each section with a simple type changed)
    assert changed_keys(base, settings(daemon={"warmup": False}, archive={"max_age_s": 5}, model={"threshold": 0.1})) == [
        "archive.max_age_s",
        "daemon.warmup",
    ]


# -- several models ---------------------------------------------------------------------------------

TOP = {"id": "top", "path": "/m/top.keras"}
SIDE = {"id": "side", "path": "/m/side.keras"}
CAM_TOP = {"id": "cam-top", "url": "synthetic://?seed=1", "model": "top"}
CAM_SIDE = {"id": "cam-side", "url": "synthetic://?seed=2", "model": "side"}
HASHES = {"top": "1" * 64, "side": "2" * 64}


def two(top=None, side=None, cameras=None, **sections) -> Settings:
    return Settings(models=[{**TOP, **(top or {})}, {**SIDE, **(side or {})}], cameras=cameras or [CAM_TOP, CAM_SIDE], **sections)


# (name, new settings, new hashes, expected: load_models, swap_context, applied, cameras restarted)
MODEL_CASES = [
    ("nothing", two(), HASHES, (), False, (), ()),
    (
        "one model's file rewritten",
        two(),
        {**HASHES, "side": "3" * 64},
        ("side",),
        True,
        ("models.side file (new contents)",),
        (),
    ),
    (
        "one model's path",
        two(side={"path": "/m/side2.keras"}),
        {**HASHES, "side": "3" * 64},
        ("side",),
        True,
        ("models.side.path",),
        (),
    ),
    ("one model's threshold: no engine", two(top={"threshold": 0.3}), HASHES, (), True, ("models.top.threshold",), ()),
    ("one model's runtime", two(top={"runtime": "openvino"}), HASHES, ("top",), True, ("models.top.runtime",), ()),
    ("max_batch: every model", two(batching={"max_batch": 2}), HASHES, ("top", "side"), True, ("batching.max_batch",), ()),
    (
        "a model added, a camera moved to it: no camera restarts",
        Settings(models=[TOP, SIDE, {"id": "new", "path": "/m/new.keras"}], cameras=[CAM_TOP, {**CAM_SIDE, "model": "new"}]),
        {**HASHES, "new": "4" * 64},
        ("new",),
        True,
        ("models.new (added)", "cameras.cam-side.model"),
        (),
    ),
    (
        "a model removed, its camera moved away",
        Settings(models=[TOP], cameras=[CAM_TOP, {**CAM_SIDE, "model": "top"}]),
        {"top": HASHES["top"]},
        (),
        True,
        ("models.side (removed)", "cameras.cam-side.model"),
        (),
    ),
    (
        "the default model changes with the order",
        Settings(models=[SIDE, TOP], cameras=[CAM_TOP, CAM_SIDE]),
        HASHES,
        (),
        True,
        ("models (order: the first is the default)",),
        (),
    ),
]


@pytest.mark.parametrize(
    ("name", "new", "hashes", "load", "swap", "applied", "restarted"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES]
)
def test_plan_per_model(name, new, hashes, load, swap, applied, restarted):
    """A change of one model loads that model alone; the others keep their engines, and no camera restarts."""
    plan = plan_reload(two(), new, HASHES, hashes)
    assert (plan.load_models, plan.swap_context) == (load, swap)
    assert plan.applied == applied
    assert tuple(c.id for c in plan.restart_cameras) == restarted
    assert plan.needs_restart == () and plan.stop_cameras == () and plan.start_cameras == ()


def test_a_camera_added_on_another_model_swaps_the_context():
    """The context says which model a camera's frames go to: a new camera naming model side needs a new one
    (without it, its frames would go to the default model)."""
    cam_new = {"id": "cam-new", "url": "synthetic://?seed=3", "model": "side"}
    plan = plan_reload(two(), two(cameras=[CAM_TOP, CAM_SIDE, cam_new]), HASHES, HASHES)
    assert plan.swap_context and plan.load_models == () and [c.id for c in plan.start_cameras] == ["cam-new"]
    assert plan.effective.model_of(plan.effective.cameras[-1]) == "side"
