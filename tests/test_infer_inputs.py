"""What `inspectd infer` accepts: the dataset layout `train` takes (labels recorded), and `builtin:demo`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from inspectd.errors import DataError
from inspectd.toolkit.infer import _expand


def _image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((40, 56, 3), value, np.uint8))
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """The reference's layout: 0/ (normal) and 1/ (anomaly), masks/ for a defect, and one loose image on top."""
    root = tmp_path / "samples"
    _image(root / "0" / "a.png", 40)
    _image(root / "0" / "b.jpg", 60)
    _image(root / "1" / "c.png", 200)
    _image(root / "masks" / "c.png", 255)  # ground truth, never an input
    _image(root / "loose.png", 120)
    (root / "notes.txt").write_text("not an image")
    return root


def _labels(inputs) -> dict[str, int | None]:
    return {f"{i.path.parent.name}/{i.path.name}": i.label for i in inputs}


def test_a_dataset_folder_expands_to_its_class_folders_with_labels(dataset):
    assert _labels(_expand((dataset,))) == {"samples/loose.png": None, "0/a.png": 0, "0/b.jpg": 0, "1/c.png": 1}


@pytest.mark.parametrize("ok, bad", [("ok", "defect"), ("good", "bad"), ("0", "1")])
def test_every_class_folder_alias_is_read(tmp_path, ok, bad):
    _image(tmp_path / ok / "x.png", 10)
    _image(tmp_path / bad / "y.png", 250)
    assert _labels(_expand((tmp_path,))) == {f"{ok}/x.png": 0, f"{bad}/y.png": 1}


def test_a_class_folder_alone_is_read_as_plain_images(dataset):
    assert _labels(_expand((dataset / "1",))) == {"1/c.png": None}


def test_a_folder_with_nothing_to_infer_says_where_it_looked(tmp_path):
    (tmp_path / "masks").mkdir()
    _image(tmp_path / "masks" / "m.png", 255)
    with pytest.raises(DataError, match=r"no images or videos in .*class folders ok/ defect/"):
        _expand((tmp_path,))


def test_two_folders_for_one_class_are_refused(tmp_path):
    _image(tmp_path / "ok" / "a.png", 10)
    _image(tmp_path / "good" / "b.png", 10)
    with pytest.raises(DataError, match="both good/ and ok/ hold class 'ok'"):
        _expand((tmp_path,))


@pytest.mark.slow
def test_infer_cli_takes_builtin_demo_and_a_dataset_folder(dataset, tmp_path):
    out = tmp_path / "out"
    r = run_cli("infer", "builtin:demo", dataset, "--out", out)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_name = {rec["name"]: rec for rec in records}
    assert sorted(by_name) == ["a", "b", "c", "loose"]  # masks/c.png is not an input: no "c-2"
    assert {name: rec.get("label") for name, rec in by_name.items()} == {"a": 0, "b": 0, "c": 1, "loose": None}
    assert Path(by_name["c"]["input"]) == dataset / "1" / "c.png"
    for name in by_name:
        assert cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED).shape == (40, 56)
