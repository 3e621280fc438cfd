"""Precision as an explicit, gated choice; `runtime = "auto"` measuring; INT8 export with its quality gate.

The autotune tests measure fake runtimes of known speed (each call waits a fixed time per batch and per
frame, as a model does): what is measured here is the choosing and the caching, not a runtime. The
INT8 tests quantize the tests' tiny trained model with the real NNCF and ONNX Runtime, and check the
gate against a calibration broken on purpose.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from conftest import run_cli

from inspectd.errors import ConfigError, ExitCode
from inspectd.pipeline import autotune
from inspectd.pipeline.autotune import Candidate

# seconds per call: a fixed cost (the call's overhead) and a cost per frame
SPEEDS = {"fast": (0.0005, 0.002), "slow": (0.0005, 0.010), "batching": (0.012, 0.0005)}


def _fake_runtimes(opened: list):
    """An Opener over fake runtimes of known speed; `opened` records which were opened."""

    def opener(runtime: str, hint: str):
        opened.append((runtime, hint))
        if runtime == "broken":
            raise RuntimeError("cannot load the graph")
        fixed, per_frame = SPEEDS[runtime]

        def run(frames):
            # A fake model of known cost: the wait is the work (the test measures the choosing, not a runtime).
            time.sleep(fixed + per_frame * len(frames))

        return run

    return opener


def _choose(opener, wanted, tmp_path, **kw):
    kw = {"sha256": "ab" * 32, "precision": "float32", "tf_device": "/CPU:0", "versions": {"fake": "1"}, **kw}
    return autotune.choose(opener, wanted, np.zeros((8, 8, 3), np.uint8), cache_root=tmp_path, seconds=0.1, **kw)


def test_auto_picks_the_fastest_runtime_and_batch_and_caches_it(tmp_path):
    opened: list = []
    wanted = [Candidate(r, b) for r in ("slow", "fast", "batching") for b in (1, 8)]
    choice = _choose(_fake_runtimes(opened), wanted, tmp_path)
    # per frame: fast 2.5 ms at b1, 2.1 ms at b8; slow 10.5 / 10.1 ms; batching 12.5 ms at b1, 2.0 ms at b8
    fps = {t.candidate: t.fps for t in choice.trials}
    assert (
        fps[Candidate("fast", 1)] > 2 * fps[Candidate("slow", 1)]
        and fps[Candidate("batching", 8)] > 3 * fps[Candidate("batching", 1)]
    )
    assert choice.best in (Candidate("fast", 8), Candidate("batching", 8)) and not choice.cached
    assert sorted(opened) == [("batching", ""), ("fast", ""), ("slow", "")]  # one open per runtime, all batch sizes
    table = autotune.format_table(choice)
    assert f"{choice.best.label()}" in table and "<- chosen" in table and "measured now" in table

    def must_not_open(runtime, hint):
        raise AssertionError(f"{runtime} opened: the cached measurement should have been used")

    again = _choose(must_not_open, wanted, tmp_path)
    assert again.cached and again.best == choice.best and again.trials == choice.trials
    assert "cached measurement" in autotune.format_table(again)


def test_auto_measures_again_when_the_key_changes(tmp_path):
    wanted = [Candidate("fast", 1), Candidate("slow", 1)]
    _choose(_fake_runtimes([]), wanted, tmp_path)
    for change in ({"versions": {"fake": "2"}}, {"precision": "int8"}, {"sha256": "cd" * 32}):
        opened: list = []
        choice = _choose(_fake_runtimes(opened), wanted, tmp_path, **change)
        assert not choice.cached and sorted(opened) == [("fast", ""), ("slow", "")], change
    files = sorted(p.name for p in (tmp_path / "autotune").iterdir())
    assert len(files) == 4 and all(name.endswith(".json") for name in files)


def test_auto_measures_only_what_the_cache_lacks(tmp_path):
    _choose(_fake_runtimes([]), [Candidate("fast", 1)], tmp_path)
    opened: list = []
    choice = _choose(_fake_runtimes(opened), [Candidate("fast", 1), Candidate("slow", 1), Candidate("fast", 4)], tmp_path)
    assert sorted(opened) == [("fast", ""), ("slow", "")] and not choice.cached
    assert {t.candidate for t in choice.trials} == {Candidate("fast", 1), Candidate("slow", 1), Candidate("fast", 4)}
    # a narrower request later is answered from the merged table, without measuring
    assert _choose(_fake_runtimes(opened := []), [Candidate("slow", 1)], tmp_path).cached and opened == []


def test_a_runtime_that_fails_loses_with_its_reason(tmp_path):
    choice = _choose(_fake_runtimes([]), [Candidate("broken", 1), Candidate("slow", 1)], tmp_path)
    assert choice.best == Candidate("slow", 1)
    failed = [t for t in choice.trials if t.fps is None]
    assert [t.candidate.runtime for t in failed] == ["broken"] and "cannot load the graph" in failed[0].error
    assert "failed" in autotune.format_table(choice)
    with pytest.raises(RuntimeError, match="no runtime could run the model: broken b1: RuntimeError: cannot load"):
        _choose(_fake_runtimes([]), [Candidate("broken", 1)], tmp_path / "other")


def test_a_damaged_cache_is_measured_again(tmp_path):
    wanted = [Candidate("fast", 1)]
    _choose(_fake_runtimes([]), wanted, tmp_path)
    (cached,) = (tmp_path / "autotune").iterdir()
    cached.write_text("{not json")
    opened: list = []
    assert not _choose(_fake_runtimes(opened), wanted, tmp_path).cached and opened == [("fast", "")]
    assert json.loads(cached.read_text())["trials"][0]["candidate"]["runtime"] == "fast"  # rewritten whole


def test_precision_config_values():
    from pydantic import ValidationError

    from inspectd.config import ModelConfig

    assert ModelConfig().precision == "float32"
    assert ModelConfig(precision="mixed_float16").precision == "float16"  # the older name
    for value in ("bfloat16", "int8"):
        assert ModelConfig(precision=value).precision == value
    with pytest.raises(ValidationError, match="float32"):
        ModelConfig(precision="fp8")


# --- INT8 with the real quantizers on the tests' tiny model ---------------------------------------------------------

LOOSE = ("--max-image-auc-drop", "0.2", "--max-pixel-auc-drop", "0.2", "--max-iou-drop", "0.3", "--max-verdict-change", "0.5")


def _gate(cache, trained, runtime):
    from inspectd.model.deployable import load_model
    from inspectd.model.gates import gate_file

    d = load_model(trained.model_path)
    return json.loads(gate_file(cache, d.sha256, runtime, "int8").read_text()), d


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_int8_export_passes_its_gate_and_the_daemon_runs_it(trained, synth_train, runtime, tmp_path):
    """The default calibration (the training split) and validation (its validation split), loose tolerances:
    the tiny model is trained from scratch in seconds, the point is the path, not the tolerance."""
    from sklearn.metrics import roc_auc_score

    from inspectd.imageio import read_rgb
    from inspectd.model import export
    from inspectd.pipeline.engine import InferenceEngine

    cache = tmp_path / "cache"
    run = run_cli("export", trained.model_path, "--runtime", runtime, "--int8", "--cache-dir", cache, *LOOSE)
    assert run.returncode == 0, run.stderr
    assert "quality gate:" in run.stdout and "PASSED" in run.stdout and "image_auc" in run.stdout
    record, d = _gate(cache, trained, runtime)
    assert record["passed"] and record["validation"]["images"] > 0 and record["calibration"]["images"] > 0
    assert record["calibration"]["source"] == "the training split"
    int8 = export.cached_int8(d, {"openvino": "openvino", "onnxruntime": "onnx"}[runtime], cache)
    assert int8.exists()

    paths = sorted((synth_train / "ok").iterdir())[:8] + sorted((synth_train / "defect").iterdir())[:8]
    frames = [read_rgb(p) for p in paths]
    q = InferenceEngine(d, (16,), "cpu", precision="int8", runtime=runtime, cache_dir=cache)
    f = InferenceEngine(d, (16,), "cpu", runtime=runtime, cache_dir=cache)
    assert q.gate is not None and q.gate["passed"] and q.precision == "int8"
    (qs, qm), (fs, fm) = q.infer(frames), f.infer(frames)
    assert qm.shape == fm.shape and not np.array_equal(qm, fm)  # another model, not float32 under another name
    labels = [0] * 8 + [1] * 8
    assert np.corrcoef(qs, fs)[0, 1] > 0.9 and roc_auc_score(labels, qs) >= roc_auc_score(labels, fs) - 0.1
    # an INT8 model replaced after its gate (another export that did not finish) is not run on this gate's pass
    stamp = int8.parent / export.STAMP
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "id": "another"}))
    with pytest.raises(ConfigError, match="not the one its quality gate measured"):
        InferenceEngine(d, (16,), "cpu", precision="int8", runtime=runtime, cache_dir=cache)


@pytest.mark.slow
def test_the_gate_refuses_a_broken_calibration(trained, tmp_path):
    """All-black calibration images: the activations' ranges are wrong for real parts, the INT8 model's scores
    collapse, and the gate (default tolerances) refuses it: exit 65, no INT8 model kept, the daemon refuses."""
    import cv2

    from inspectd.model import export
    from inspectd.pipeline.engine import InferenceEngine

    black = tmp_path / "black"
    black.mkdir()
    for i in range(8):
        cv2.imwrite(str(black / f"{i}.png"), np.zeros((96, 96, 3), np.uint8))
    cache = tmp_path / "cache"
    run = run_cli("export", trained.model_path, "--runtime", "openvino", "--int8", "--calibration", black, "--cache-dir", cache)
    assert run.returncode == ExitCode.DATA == 65, run.stderr
    assert "REFUSED" in run.stdout and "quality gate refused int8" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()[-1]) < 600
    record, d = _gate(cache, trained, "openvino")
    assert not record["passed"] and "drop beyond tolerance" in record["why"]
    with pytest.raises(ConfigError, match="inspectd export"):
        export.cached_int8(d, "openvino", cache)
    with pytest.raises(ConfigError, match="failed its quality gate"):
        InferenceEngine(d, (1,), "cpu", precision="int8", runtime="openvino", cache_dir=cache)


def test_a_precision_without_its_gate_is_refused_with_the_command(trained, tmp_path):
    from inspectd.pipeline.engine import InferenceEngine

    with pytest.raises(ConfigError, match="run `inspectd export MODEL --runtime openvino --precision bfloat16`"):
        InferenceEngine(
            trained_model(trained.model_path), (1,), "cpu", precision="bfloat16", runtime="openvino", cache_dir=tmp_path
        )


def trained_model(path):
    from inspectd.model.deployable import load_model

    return load_model(path)


def test_export_usage_errors(tmp_path):
    for args, message in (
        (("--runtime", "auto", "--precision", "int8"), "name the runtime it is for"),
        (("--runtime", "tensorflow", "--int8"), "tensorflow does not run it"),
        (("--runtime", "onnxruntime", "--precision", "bfloat16"), "onnxruntime does not run it"),
        (("--runtime", "openvino", "--int8", "--out", tmp_path / "o"), "--out writes one float32 conversion"),
        (("--int8", "--precision", "bfloat16", "--runtime", "openvino"), "one precision at a time"),
        ((), "give --runtime"),
    ):
        run = run_cli("export", "builtin:demo", *args, "--cache-dir", tmp_path)
        assert run.returncode == ExitCode.USAGE and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


@pytest.mark.slow
def test_export_auto_prints_the_table_the_daemon_then_reads(tmp_path):
    from inspectd.model.deployable import load_model, resolve_model_path
    from inspectd.pipeline.engine import InferenceEngine

    run = run_cli("export", "builtin:demo", "--runtime", "auto", "--seconds", "0.2", "--cache-dir", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "runtime auto on" in run.stdout and "<- chosen" in run.stdout
    for label in ("onnxruntime b1", "openvino/latency b8", "openvino/throughput b4", "tensorflow b2"):
        assert label in run.stdout
    # a daemon with runtime auto and a batch size the export measured starts on the cached choice
    engine = InferenceEngine(load_model(resolve_model_path("builtin:demo")), (4,), "cpu", runtime="auto", cache_dir=tmp_path)
    assert engine.choice is not None and engine.choice.cached
    assert engine.choice.best.label() in run.stdout


def test_the_gate_refuses_what_it_could_not_measure_and_a_shift_of_every_score():
    """ROC-AUC is blind to a shift of all scores and NaN compares False with any tolerance: both must refuse."""
    from inspectd.toolkit.gate import Quality, Tolerance, _drops

    scores = tuple(np.linspace(0.05, 0.95, 40).tolist())
    ref = Quality(0.99, 0.95, 0.30, scores)
    assert _drops(ref, Quality(0.99, 0.95, 0.30, scores), Tolerance(), 0.5)[1] == []
    shifted = tuple(min(1.0, x + 0.1) for x in scores)  # the same ranking, every score 0.1 higher
    drops, failed = _drops(ref, Quality(0.99, 0.95, 0.30, shifted), Tolerance(), 0.5)
    assert failed == ["verdict_change"] and drops["verdict_change"] == pytest.approx(0.1)
    drops, failed = _drops(ref, Quality(0.99, float("nan"), float("nan"), scores), Tolerance(), 0.5)
    assert failed == ["pixel_auc", "region_iou"] and drops["pixel_auc"] is None


def test_the_gate_needs_enough_validation_images_apart_from_the_calibration(synth_test, tmp_path):
    few = tmp_path / "few"
    for label, n in (("ok", 12), ("defect", 3)):
        (few / label).mkdir(parents=True)
        for path in sorted((synth_test / label).iterdir())[:n]:
            shutil.copy(path, few / label / path.name)
    run = run_cli(
        "export",
        "builtin:demo",
        "--runtime",
        "openvino",
        "--precision",
        "bfloat16",
        "--validation",
        few,
        "--cache-dir",
        tmp_path / "c",
    )
    assert run.returncode == ExitCode.DATA and "at least 10 ok and 10 defect images, found 12 and 3" in run.stderr
    assert not (tmp_path / "c" / "gates").exists()  # refused before anything was written
    run = run_cli(
        "export",
        "builtin:demo",
        "--runtime",
        "openvino",
        "--int8",
        "--validation",
        synth_test,
        "--calibration",
        synth_test / "ok",
        "--cache-dir",
        tmp_path / "c",
    )
    assert run.returncode == ExitCode.USAGE and "overlap" in run.stderr, run.stderr
