"""The command line as a user meets it: outputs on disk, and one-line errors with documented exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "convert", "infer", "evaluate", "synth"):
        assert cmd in r.stdout


@pytest.fixture()
def tiny_dataset(tmp_path, synth_train) -> Path:
    """A copy of a few synth images that a test may break."""
    out = tmp_path / "data"
    for cls in ("ok", "defect"):
        (out / cls).mkdir(parents=True)
        for p in sorted((synth_train / cls).iterdir())[:3]:
            shutil.copy(p, out / cls / p.name)
    return out


def test_train_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(
        run_cli("train", tmp_path / "empty", "--out", tmp_path / "m.keras", "--weights", "none"), 65, "no class folders", "ok/"
    )


def test_train_missing_folder(tmp_path):
    _one_line_error(run_cli("train", tmp_path / "nope", "--out", tmp_path / "m.keras"), 66, "no such dataset")


def test_train_one_class_missing(tiny_dataset, tmp_path):
    shutil.rmtree(tiny_dataset / "defect")
    _one_line_error(
        run_cli("train", tiny_dataset, "--out", tmp_path / "m.keras", "--weights", "none"), 65, "'defect' has no images"
    )


def test_train_unreadable_image(tiny_dataset, tmp_path):
    (tiny_dataset / "ok" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _one_line_error(
        run_cli(
            "train",
            tiny_dataset,
            "--out",
            tmp_path / "m.keras",
            "--weights",
            "none",
            "--input-size",
            "64x64",
            "--val",
            tiny_dataset,
        ),
        65,
        "broken.png",
        "not a readable image",
    )
    assert not (tmp_path / "m.keras").exists()


def test_train_bad_input_size(tiny_dataset, tmp_path):
    _one_line_error(
        run_cli("train", tiny_dataset, "--out", tmp_path / "m.keras", "--input-size", "100x100"),
        2,
        "100x100",
        "multiples of the output stride 16",
    )


def test_train_stride_8_needs_an_atrous_backbone_said_before_the_data_check(tiny_dataset, tmp_path):
    r = run_cli("train", tiny_dataset, "--out", tmp_path / "m.keras", "--backbone", "efficientnetv2b0", "--stride", "8")
    _one_line_error(r, 2, "--stride 8: efficientnetv2b0 has no atrous variant")
    assert "checking" not in r.stderr


def test_train_bad_size_syntax(tiny_dataset, tmp_path):
    _one_line_error(run_cli("train", tiny_dataset, "--out", tmp_path / "m.keras", "--input-size", "big"), 2, "WIDTHxHEIGHT")


def test_infer_with_a_file_that_is_not_a_model(tmp_path, synth_test):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"hello")
    _one_line_error(run_cli("infer", fake, synth_test / "ok", "--out", tmp_path / "o"), 65, "not an inspectd model")


def test_synth_bad_arguments(tmp_path):
    _one_line_error(run_cli("synth", tmp_path / "s", "--n", "1"), 2, "n")


def _video(path: Path, frames: int = 30, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (128, 96))
    for i in range(frames):
        writer.write(np.full((96, 128, 3), 40 + 5 * i, np.uint8))
    writer.release()
    return path


def test_infer_images_folders_video(trained, synth_test, tmp_path):
    grey = sorted((synth_test / "defect").iterdir())[0]
    colour = tmp_path / "colour.jpg"
    image = cv2.imread(str(grey))
    image[..., 2] = np.clip(image[..., 2].astype(int) + 30, 0, 255)  # make it really colour
    cv2.imwrite(str(colour), image)
    video = _video(tmp_path / "clip.avi")
    out = tmp_path / "out"
    r = run_cli("infer", trained.model_path, grey, colour, synth_test / "ok", video, "--out", out, "--every", "1")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    n_ok = len(list((synth_test / "ok").iterdir()))
    frames = [rec for rec in records if "frame" in rec]
    assert len(records) == 2 + n_ok + len(frames) and [f["frame"] for f in frames] == [0, 10, 20]
    for rec in records:
        overlay = cv2.imread(str(out / f"{rec['name']}_overlay.png"))
        mask = cv2.imread(str(out / f"{rec['name']}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert overlay is not None and mask is not None and mask.ndim == 2
        assert overlay.shape[:2] == mask.shape == ((96, 128) if "frame" in rec else (96, 96))
        assert 0.0 <= rec["score"] <= 1.0 and rec["is_defect"] == (rec["score"] >= rec["threshold"])
        kept = out / f"{rec['name']}_regions.png"  # defects: exactly the regions, losslessly
        assert kept.exists() == rec["is_defect"]
        if rec["is_defect"]:
            kept = cv2.imread(str(kept), cv2.IMREAD_UNCHANGED)
            assert kept.shape == mask.shape and int((kept == 255).sum()) == sum(r["area_px"] for r in rec["regions"])
        for region in rec["regions"]:
            x, y, w, h = region["bbox"]
            assert 0 <= x and x + w <= mask.shape[1] and region["area_px"] > 0 and region["peak"] >= 0.5


def test_grey_and_colour_inputs_agree(trained, synth_test, tmp_path):
    """A grey PNG and the same image stored as 3 equal channels give the same prediction."""
    grey = sorted((synth_test / "defect").iterdir())[1]
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), cv2.cvtColor(cv2.imread(str(grey), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR))
    r = run_cli("infer", trained.model_path, grey, rgb, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    a, b = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert a["score"] == pytest.approx(b["score"], abs=1e-6)


def test_infer_skips_unreadable_but_keeps_the_rest(trained, synth_test, tmp_path):
    good = sorted((synth_test / "ok").iterdir())[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = run_cli("infer", trained.model_path, bad, good, "--out", tmp_path / "o")
    assert r.returncode == 65 and "Traceback" not in r.stderr and "bad.png" in r.stderr
    records = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [rec.get("name") for rec in records if "score" in rec] == [good.stem]
    assert any("error" in rec and rec["input"].endswith("bad.png") for rec in records)
    assert (tmp_path / "o" / f"{good.stem}_overlay.png").is_file()


def test_evaluate_report(tf, trained, synth_test, tmp_path):
    r = run_cli("evaluate", trained.model_path, synth_test, "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert "calibrated" in r.stdout and "minmax" in r.stdout and "ROC-AUC" in r.stdout
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["image"]) >= {"roc_auc", "average_precision", "accuracy", "precision", "recall", "f1", "threshold"}
    for name in ("calibrated", "gated", "minmax"):
        assert set(report["pixel"][name]) >= {"roc_auc", "aupro", "iou", "dice", "threshold"}
        assert 0.0 <= report["pixel"][name]["iou"] <= report["pixel"][name]["dice"] <= 1.0
    assert report["n_images"] == 80 and report["model"]["name"] == "tiny"
    assert report["image"]["roc_auc"] >= 0.9
    # The reported image ROC-AUC is sklearn's on the model's own scores (the model called directly here).
    from sklearn.metrics import roc_auc_score

    from inspectd.imageio import read_rgb
    from inspectd.model.deployable import load_model
    from inspectd.toolkit.dataset import scan

    data = scan(synth_test)
    images = np.stack([read_rgb(it.path) for it in data.items]).astype(np.float32)
    scores = load_model(trained.model_path).model(images, training=False)["score"].numpy()
    assert report["image"]["roc_auc"] == pytest.approx(roc_auc_score(data.labels, scores), abs=1e-3)
    assert (tmp_path / "rep" / "roc_pr.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_without_masks_has_no_pixel_block(trained, synth_test, tmp_path):
    data = tmp_path / "nomask"
    shutil.copytree(synth_test, data, ignore=shutil.ignore_patterns("masks"))
    r = run_cli("evaluate", trained.model_path, data, "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert "pixel" not in json.loads((tmp_path / "rep" / "report.json").read_text())
