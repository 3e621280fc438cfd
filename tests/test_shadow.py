"""A shadow model (docs/models.md#a-shadow-model): its bookkeeping checked against libraries and against what the
daemon published, with two real trained tiny models on synthetic cameras; then promoted through the reload path."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from conftest import TRAIN_SIZE, run_cli, tiny_recipe
from daemon_util import DaemonProcess, camera_toml, daemon_config
from support import collect_events, scrape, wait_until

from inspectd.client import Subscriber
from inspectd.config import Settings
from inspectd.model.deployable import file_sha256
from inspectd.pipeline.shadow import Agreement, ShadowStore

W, H = TRAIN_SIZE


def test_agreement_sums_are_what_the_libraries_say():
    """Confusion counts as scikit-learn's confusion_matrix, the correlation as numpy's corrcoef, the mean IoU as
    the plain mean; and the sums survive the summary's JSON (a restart carries on from them)."""
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(3)
    p_scores, s_scores = rng.uniform(size=200), rng.uniform(size=200)
    s_scores = 0.6 * p_scores + 0.4 * s_scores  # correlated, not identical
    p_def, s_def = p_scores >= 0.5, s_scores >= 0.4
    ious = rng.uniform(size=200)
    a = Agreement()
    for i in range(200):
        a.add(
            bool(p_def[i]),
            bool(s_def[i]),
            float(p_scores[i]),
            float(s_scores[i]),
            float(ious[i]) if p_def[i] and s_def[i] else None,
        )
    (oo, od), (do, dd) = confusion_matrix(p_def, s_def, labels=[False, True])
    assert a.confusion == {"defect/defect": dd, "defect/ok": do, "ok/defect": od, "ok/ok": oo}
    assert a.frames == 200 and a.disagreements == od + do
    assert a.agreement == pytest.approx((dd + oo) / 200)
    assert a.correlation == pytest.approx(np.corrcoef(p_scores, s_scores)[0, 1], abs=1e-9)
    assert a.iou == pytest.approx(ious[p_def & s_def].mean())
    again = Agreement.from_dict(json.loads(json.dumps(a.as_dict())))
    assert again.as_dict() == a.as_dict()
    assert Agreement().correlation is None and Agreement().agreement is None


def test_the_store_keeps_the_newest_disagreements_each_complete(tmp_path):
    store = ShadowStore(tmp_path / "pair", keep=3)
    for i in range(5):
        store.keep_case(f"2026120{i}T000000Z_cam_{i}", {"frame.jpg": b"j" * i}, {"i": i})
    kept = sorted(p.name for p in store.cases.iterdir())
    assert kept == [f"2026120{i}T000000Z_cam_{i}" for i in (2, 3, 4)]
    for name in kept:
        assert {f.name for f in (store.cases / name).iterdir()} == {"frame.jpg", "record.json"}
    store.save({"agreement": Agreement().as_dict()})
    assert store.load().frames == 0 and not list(store.folder.glob(".*"))  # no temporaries left


def test_a_shadow_is_checked_when_the_config_is_read():
    cams = [{"id": "c", "url": "synthetic://"}]
    ok = Settings(models=[{"id": "top"}, {"id": "cand", "shadow_of": "top", "sample": 0.25}], cameras=cams)
    assert [m.id for m in ok.production_models] == ["top"] and ok.model_of(ok.cameras[0]) == "top"
    with pytest.raises(ValueError, match="a shadow: cameras name its model"):
        Settings(models=[{"id": "top"}, {"id": "cand", "shadow_of": "top"}], cameras=[{**cams[0], "model": "cand"}])
    with pytest.raises(ValueError, match="one shadow per model"):
        Settings(models=[{"id": "top"}, {"id": "a", "shadow_of": "top"}, {"id": "b", "shadow_of": "top"}], cameras=cams)
    with pytest.raises(ValueError, match="'a' is a shadow"):
        Settings(models=[{"id": "top"}, {"id": "a", "shadow_of": "top"}, {"id": "b", "shadow_of": "a"}], cameras=cams)
    with pytest.raises(ValueError, match="sample"):
        Settings(models=[{"id": "top"}, {"id": "a", "shadow_of": "top", "sample": 0}], cameras=cams)


@pytest.fixture(scope="module")
def weak(tf, synth_train, tmp_path_factory):
    """A second real model, trained one epoch only: the weaker of the two."""
    from inspectd.toolkit.train import train

    return train(tiny_recipe(synth_train, tmp_path_factory.mktemp("weak") / "weak.keras", epochs=1, seed=1)).model_path


@pytest.mark.slow
def test_a_shadow_measures_its_agreement_keeps_disagreements_and_is_promoted(tmp_path, weak, trained):
    """Production: the weak model; its shadow: the strong one (the `trained` fixture), on every frame of two
    synthetic cameras. The shadow never publishes; what it counts matches the verdicts production published;
    each disagreement kept is a frame where the two verdicts differ, with production's published score. Then
    `inspectd shadow promote` rewrites the config and a reload makes the strong model production."""
    url = "synthetic://?fps=6&width={w}&height={h}&defect_rate=0.5&seed={seed}"
    cameras = "".join(camera_toml(c, url.format(w=W, h=H, seed=i + 1), model="top") for i, c in enumerate(("cam-a", "cam-b")))
    models = [
        {"id": "top", "path": str(weak)},
        {"id": "cand", "path": str(trained.model_path), "shadow_of": "top"},
    ]
    config, urls = daemon_config(
        tmp_path, cameras, models=models, archive={"dir": str(tmp_path / "archive")}, publish={"results": True}
    )
    config.write_text("# the line's config: this comment stays through a promotion\n" + config.read_text())
    with DaemonProcess(config, tmp_path / "d.log") as daemon, Subscriber(urls["events"], topics=["result."]) as sub:
        # `runtime auto` converts both models twice and times 8 candidates each before the daemon is ready: about a
        # minute on an idle 2-core machine, past two on a busy one.
        daemon.wait_ready(urls["metrics"], timeout=300)

        def compared() -> float:
            return sum(s.value for s in scrape(urls["metrics"]).find("inspectd_shadow_frames_total", model="top", shadow="cand"))

        results = collect_events(
            sub, lambda evs: len(evs) >= 60 and compared() >= 40, kinds=("result",), timeout=120, message=daemon.log
        )
        assert {ev.header["model"]["id"] for ev in results} == {"top"}  # the shadow never publishes
        m = scrape(urls["metrics"])
        assert (m.value("inspectd_inference_seconds_count", model="cand") or 0) > 0
        [info] = m.find("inspectd_model_info", model="cand")
        assert info.labels["shadow_of"] == "top"
        reports: list = []

        def reported() -> bool:  # the daemon writes its summary every 10 s
            report = run_cli("shadow", "report", "--config", config, "--json")
            assert report.returncode == 0, report.stderr
            reports[:] = json.loads(report.stdout)
            return reports[0].get("agreement", {}).get("frames", 0) > 0

        wait_until(reported, 60, lambda: f"a shadow report with frames: {reports}")
        assert reports[0]["model"] == "top" and reports[0]["shadow"] == "cand"
        assert reports[0]["shadow_sha256"] == file_sha256(trained.model_path)
        text = run_cli("shadow", "report", "--config", config).stdout
        assert "shadow cand of model top" in text and "verdicts agree on" in text

        # Promotion: the config rewritten (comments kept, the shadow's table gone), then a reload.
        promoted = run_cli("shadow", "promote", "top", "--config", config)
        assert promoted.returncode == 0, promoted.stderr
        text = config.read_text()
        assert text.startswith("# the line's config") and "shadow_of" not in text and str(trained.model_path) in text
        assert (tmp_path / "inspectd.toml.before-promote").read_text().count("shadow_of") == 1
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("applied: models.top.path", timeout=90)
        strong_sha = file_sha256(trained.model_path)
        after = collect_events(
            sub,
            lambda evs: any(ev.header["model"]["sha256"] == strong_sha for ev in evs),
            kinds=("result",),
            timeout=60,
            message=daemon.log,
        )
        assert after[-1].header["model"]["id"] == "top"
        assert "models.cand (removed)" in daemon.log()
        assert daemon.terminate() == 0, daemon.log()

    # What the shadow counted, against what production published (results: every verdict).
    [folder] = (tmp_path / "archive" / ".shadow" / "top" / "cand").iterdir()
    saved = json.loads((folder / "summary.json").read_text())
    a = saved["agreement"]
    assert a["frames"] >= 40 and sum(a["confusion"].values()) == a["frames"]
    assert a["disagreements"] == a["confusion"]["defect/ok"] + a["confusion"]["ok/defect"]
    assert a["region_iou_frames"] == a["confusion"]["defect/defect"]
    published = {(ev.camera, ev.header["frame_seq"]): ev.header for ev in results}
    cases = sorted((folder / "disagreements").iterdir())
    assert len(cases) == a["disagreements"] > 0, a  # one epoch against twelve: they do disagree
    checked = 0
    for case in cases:
        record = json.loads((case / "record.json").read_text())
        assert record["production"]["is_defect"] != record["shadow"]["is_defect"]
        assert record["production"]["id"] == "top" and record["shadow"]["id"] == "cand"
        assert {f.name for f in case.iterdir()} == {"record.json", "frame.jpg", "production.png", "shadow.png"}
        header = published.get((record["camera"], record["frame_seq"]))
        if header is not None:  # production's verdict on that frame, as published
            assert record["production"]["score"] == pytest.approx(header["score"], abs=1e-5)
            assert record["production"]["is_defect"] == header["is_defect"]
            checked += 1
    assert checked > 0
