"""Several models in one daemon ([[models]]): each camera's frames go to its model, events and metrics name the
model, and a reload of one model leaves the other model and every camera as they run."""

from __future__ import annotations

import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from daemon_util import DaemonProcess, camera_toml, daemon_config
from prometheus_client import CollectorRegistry
from support import collect_events, scrape

from inspectd.client import Subscriber
from inspectd.config import Settings, load_settings
from inspectd.errors import ConfigError

pytestmark = pytest.mark.slow
URL = "synthetic://?fps=8&width=160&height=128&defect_rate=0.5&seed={}"


@pytest.fixture(scope="module")
def renamed_models(tmp_path_factory, tf):
    """The demo model saved again as demo-b and demo-c: other files, other names, other sha256."""
    from inspectd.model.deployable import load_model, resolve_model_path, save_model

    demo = load_model(resolve_model_path("builtin:demo"))
    folder = tmp_path_factory.mktemp("models")
    for name in ("demo-b", "demo-c"):
        save_model(demo.model, folder / f"{name}.keras", {**demo.meta, "name": name})
    return folder


def _two_models(tmp_path, models) -> tuple:
    """cam-a on model top (builtin demo), cam-b on model side (demo-b); threshold 0: every frame is a defect."""
    cameras = camera_toml("cam-a", URL.format(1), model="top") + camera_toml("cam-b", URL.format(2), model="side")
    tables = [
        {"id": "top", "path": "builtin:demo", "threshold": 0.0},
        {"id": "side", "path": str(models / "demo-b.keras"), "threshold": 0.0},
    ]
    return daemon_config(tmp_path, cameras, models=tables)


def _models(events, camera: str) -> list[tuple[str, str]]:
    return [(ev.header["model"]["id"], ev.header["model"]["name"]) for ev in events if ev.camera == camera]


def test_each_camera_runs_on_its_model_and_a_reload_of_one_model_leaves_the_other(tmp_path, renamed_models):
    config, urls = _two_models(tmp_path, renamed_models)
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["defect."]) as sub:
        daemon.wait_ready(urls["metrics"])
        before = collect_events(sub, lambda evs: {"cam-a", "cam-b"} <= {ev.camera for ev in evs}, timeout=60, message=daemon.log)
        assert set(_models(before, "cam-a")) == {("top", "demo")}
        assert set(_models(before, "cam-b")) == {("side", "demo-b")}
        m = scrape(urls["metrics"])
        for model in ("top", "side"):  # each model's own batches
            assert (m.value("inspectd_inference_seconds_count", model=model) or 0) > 0, model
        info = {s.labels["model"]: s.labels["name"] for s in m.find("inspectd_model_info")}
        assert info == {"top": "demo", "side": "demo-b"}
        cameras = {s.labels["camera"]: s.labels["model"] for s in m.find("inspectd_camera_info")}
        assert cameras == {"cam-a": "top", "cam-b": "side"}

        # A new file for model side only: side gets a new engine, top keeps its own, no camera restarts.
        config.write_text(config.read_text().replace("demo-b.keras", "demo-c.keras"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("applied: models.side.path", timeout=90)
        after = collect_events(sub, lambda evs: ("side", "demo-c") in _models(evs, "cam-b"), timeout=60, message=daemon.log)
        changed = _models(before + after, "cam-b")
        assert changed == sorted(changed, key=lambda m: m == ("side", "demo-c")), changed  # old until the swap, then new
        assert set(_models(after, "cam-a")) <= {("top", "demo")}
        log = daemon.log()
        assert log.count("model top (demo) runs with") == 1 and log.count("model side (demo-c) runs with") == 1, log
        assert log.count("camera cam-a: up") == 1 and log.count("camera cam-b: up") == 1, log
        a_seqs = [ev.header["frame_seq"] for ev in before + after if ev.camera == "cam-a"]
        assert a_seqs == sorted(a_seqs)  # cam-a's counter goes on: not restarted
        info = {s.labels["model"]: s.labels["name"] for s in scrape(urls["metrics"]).find("inspectd_model_info")}
        assert info == {"top": "demo", "side": "demo-c"}
        assert daemon.terminate() == 0, daemon.log()


CAM = '[[cameras]]\nid = "c"\nurl = "synthetic://"\n'


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('[[models]]\nid = "a"\n[[models]]\nid = "a"\n' + CAM, "model ids must be unique; repeated: a"),
        ('[[models]]\nid = "a"\n' + CAM + 'model = "b"\n', "cameras[c].model: no model 'b'; the [[models]] ids are a"),
        (CAM + 'model = "top"\n', "cameras[c].model: no model 'top'; [model] is the one model, id default"),
        (
            '[model]\nthreshold = 0.5\n[[models]]\nid = "a"\n' + CAM,
            "set [model] (one model) or [[models]] tables (several), not both",
        ),
        ('[[models]]\nid = "A b"\n' + CAM, "models.0.id"),
    ],
)
def test_model_tables_that_cannot_run_are_refused_in_one_line(tmp_path, toml, error):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert error in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_the_short_form_is_one_model_called_default():
    s = Settings(model={"threshold": 0.4}, cameras=[{"id": "c", "url": "synthetic://"}])
    [entry] = s.model_entries
    assert (entry.id, entry.threshold) == ("default", 0.4)
    assert s.model_of(s.cameras[0]) == "default"
    two = Settings(
        models=[{"id": "x"}, {"id": "y"}],
        cameras=[{"id": "c", "url": "synthetic://"}, {"id": "d", "url": "synthetic://", "model": "y"}],
    )
    assert [two.model_of(c) for c in two.cameras] == ["x", "y"]  # without `model`: the first


class _SlowEngine:
    """Fake engine (a stand-in for a model call, so that the test measures the scheduling, not a model):
    each call takes 30 ms and is logged with its start and end."""

    buckets = (1,)
    runtime, precision = "fake", "float32"

    def __init__(self, calls: list):
        self.calls = calls

    def infer(self, images, interrupt=None):
        start = time.monotonic()
        time.sleep(0.03)
        self.calls.append((start, time.monotonic()))
        n = len(images)
        return np.full(n, 0.1, np.float32), np.zeros((n, 4, 4), np.float32)


def test_each_model_has_its_own_thread_and_their_calls_overlap():
    """Two models, a camera each, always a frame ready: both models' calls go on, at once (a thread each: a
    model's frames never wait behind the other model's call), and the threads end at stop."""
    from inspectd.frames import Frame
    from inspectd.metrics import Metrics
    from inspectd.pipeline.context import InferenceContext, ModelRun
    from inspectd.pipeline.core import Pipeline
    from inspectd.pipeline.postprocess import InspectOptions

    calls: dict[str, list] = {"a": [], "b": []}
    runs = {m: ModelRun(m, _SlowEngine(calls[m]), SimpleNamespace(name=m, sha256=m * 64)) for m in ("a", "b")}
    opts = InspectOptions(threshold=0.5)
    context = InferenceContext(runs, {"a": opts, "b": opts}, 0.0, {"cam-a": "a", "cam-b": "b"})  # type: ignore[arg-type]

    class Sink:
        def publish_inspection(self, insp, model, results=False, defect_event=True): ...

        def publish_episode(self, episode, model, best_event): ...

    pipeline = Pipeline(context, Metrics(CollectorRegistry()), Sink(), workers=1)
    pipeline.start()
    image = np.zeros((8, 8, 3), np.uint8)
    seq = 0
    try:
        deadline = time.monotonic() + 30
        while min(len(c) for c in calls.values()) < 10:
            assert time.monotonic() < deadline, {m: len(c) for m, c in calls.items()}
            seq += 1
            for cam in ("cam-a", "cam-b"):
                pipeline.put(Frame(cam, seq, time.time(), time.monotonic(), image))
            time.sleep(0.005)
    finally:
        pipeline.stop(timeout=5)
    overlaps = sum(1 for s1, e1 in calls["a"] for s2, e2 in calls["b"] if s1 < e2 and s2 < e1)
    assert overlaps > 0, (calls["a"][:3], calls["b"][:3])
    assert {t.name for t in threading.enumerate()} & {"inference-a", "inference-b"} == set()  # ended at stop
