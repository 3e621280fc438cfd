"""Tests for inspectd.synth: determinism, masks that match the drawn defects, dataset layout."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspectd.synth import DEFECTS, SURFACES, DatasetSummary, Sample, render, write_dataset


def _render(seed: int, width: int = 96, height: int = 96, defect: bool = True) -> Sample:
    return render(np.random.default_rng(seed), width, height, defect)


def _read(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _files(root: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (root / sub).iterdir())


# ------------------------------------------------------------------------------------ render


def test_render_types_and_labels() -> None:
    good, bad = _render(1, 80, 48, defect=False), _render(1, 80, 48, defect=True)
    for s in (good, bad):
        assert s.image.shape == s.mask.shape == (48, 80)
        assert s.image.dtype == s.mask.dtype == np.uint8
        assert s.surface in SURFACES
        assert set(np.unique(s.mask)) <= {0, 255}
    assert not good.defect and good.kinds == () and not good.mask.any()
    assert bad.defect and 1 <= len(bad.kinds) <= 3 and set(bad.kinds) <= set(DEFECTS)
    assert bad.mask.any()


def test_render_is_deterministic() -> None:
    a, b, c = _render(7), _render(7), _render(8)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert (a.surface, a.kinds) == (b.surface, b.kinds)
    assert a.image.tobytes() != c.image.tobytes()


def test_consecutive_frames_from_one_generator_differ() -> None:
    rng = np.random.default_rng(3)
    frames = [render(rng, 64, 64, False).image.tobytes() for _ in range(4)]
    assert len(set(frames)) == 4


def test_good_samples_share_the_scene_of_their_defect_twin() -> None:
    """Same generator state: defect=False is the very same frame, minus the defects only."""
    for seed in range(40):
        bad, good = _render(seed, defect=True), _render(seed, defect=False)
        assert bad.surface == good.surface
        diff = np.abs(bad.image.astype(int) - good.image.astype(int))
        on = bad.mask > 0
        # Every mask pixel was changed materially (contrast >= 25, alpha >= 0.5 -> >= 12.5) ...
        assert (diff[on] >= 10).all(), (seed, bad.kinds)
        # ... no pixel outside it by as much as half the largest contrast (90) ...
        assert diff[~on].max() <= 46, (seed, bad.kinds)
        # ... and nothing changed away from the defects (soft edges reach a few px at most).
        near = cv2.dilate(bad.mask, np.ones((11, 11), np.uint8)) > 0
        assert not diff[~near].any(), (seed, bad.kinds)


def test_defects_stand_out_from_their_surroundings() -> None:
    """From the image alone: mask vs. its ring differs far more than a shifted mask's does."""
    inner, outer = np.ones((3, 3), np.uint8), np.ones((7, 7), np.uint8)
    real, shifted = [], []
    for seed in range(60):
        s = _render(seed, 128, 96)
        if len(s.kinds) != 1:  # a bright and a dark defect would average out
            continue
        img = s.image.astype(float)
        for mask, out in ((s.mask, real), (np.roll(s.mask, (48, 64), (0, 1)), shifted)):
            ring = (cv2.dilate(mask, outer) > 0) & ~(cv2.dilate(mask, inner) > 0)
            out.append(abs(np.median(img[mask > 0]) - np.median(img[ring])))
    assert len(real) >= 15
    assert min(real) >= 10
    assert np.median(real) > 3 * np.median(shifted)


def test_mask_covers_a_plausible_fraction() -> None:
    for size in ((64, 64), (96, 96)):
        for seed in range(30):
            fraction = (_render(seed, *size).mask > 0).mean()
            assert 0.001 <= fraction <= 0.25, (size, seed, fraction)


def test_every_surface_and_defect_kind_is_produced() -> None:
    surfaces, kinds = Counter(), Counter()
    for seed in range(48):
        s = _render(seed, 48, 48)
        surfaces[s.surface] += 1
        kinds.update(s.kinds)
    assert set(surfaces) == set(SURFACES)
    assert set(kinds) == set(DEFECTS)


def test_render_rejects_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="width and height"):
        render(np.random.default_rng(0), 15, 64, True)
    with pytest.raises(ValueError, match="width and height"):
        render(np.random.default_rng(0), 64, 8, False)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(16, 128), height=st.integers(16, 128), seed=st.integers(0, 2**32 - 1), defect=st.booleans())
def test_render_never_fails(width: int, height: int, seed: int, defect: bool) -> None:
    s = render(np.random.default_rng(seed), width, height, defect)
    assert s.image.shape == s.mask.shape == (height, width)
    assert s.image.dtype == s.mask.dtype == np.uint8
    assert set(np.unique(s.mask)) <= {0, 255}
    assert s.defect is defect and s.surface in SURFACES
    assert bool(s.mask.any()) is defect and (len(s.kinds) > 0) is defect


# ----------------------------------------------------------------------------------- dataset


def test_write_dataset_layout(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    out = tmp_path / "data"
    summary = write_dataset(out, 10, 40, 32, seed=5, defect_ratio=0.3, progress=lambda done, total: calls.append((done, total)))
    assert summary == DatasetSummary(root=out, n_ok=7, n_defect=3, width=40, height=32, seed=5)
    assert calls == [(i, 10) for i in range(1, 11)]
    ok, defect, masks = _files(out, "ok"), _files(out, "defect"), _files(out, "masks")
    assert (len(ok), len(defect)) == (7, 3)
    assert sorted(ok + defect) == [f"synth_{i:05d}.png" for i in range(10)]
    assert masks == defect
    for name in ok + defect:
        image = _read(out / ("ok" if name in ok else "defect") / name)
        assert image.shape == (32, 40) and image.dtype == np.uint8
    for name in masks:
        mask = _read(out / "masks" / name)
        assert mask.shape == (32, 40) and set(np.unique(mask)) == {0, 255}
    meta = json.loads((out / "synth.json").read_text())
    assert meta["complete"] is True
    assert {k: meta[k] for k in ("n", "n_ok", "n_defect", "width", "height", "seed")} == {
        "n": 10,
        "n_ok": 7,
        "n_defect": 3,
        "width": 40,
        "height": 32,
        "seed": 5,
    }
    assert meta["defect_ratio"] == 0.3
    assert sorted(Path(s["file"]).name for s in meta["samples"]) == sorted(ok + defect)


def test_write_dataset_is_deterministic(tmp_path: Path) -> None:
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    a = snapshot(write_dataset(tmp_path / "a", 6, 32, 24, seed=1).root)
    b = snapshot(write_dataset(tmp_path / "b", 6, 32, 24, seed=1).root)
    c = snapshot(write_dataset(tmp_path / "c", 6, 32, 24, seed=2).root)
    assert a == b
    assert a != c


def test_sample_i_does_not_depend_on_n(tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    write_dataset(small, 4, 32, 32, seed=9)
    write_dataset(big, 9, 32, 32, seed=9)
    same_class = 0
    for i in range(4):
        name = f"synth_{i:05d}.png"
        # Sample i is rendered from SeedSequence(seed).spawn(n)[i], i.e. spawn_key (i,).
        child = np.random.SeedSequence(9, spawn_key=(i,))
        assert child.state == np.random.SeedSequence(9).spawn(9)[i].state
        sub = "defect" if (small / "defect" / name).exists() else "ok"
        expected = render(np.random.default_rng(child), 32, 32, sub == "defect")
        assert np.array_equal(_read(small / sub / name), expected.image)
        if (big / sub / name).exists():
            same_class += 1
            assert (big / sub / name).read_bytes() == (small / sub / name).read_bytes()
    assert same_class >= 1  # the class draw depends on n; the seed makes some agree


def test_defect_count_is_rounded_and_keeps_both_classes(tmp_path: Path) -> None:
    assert write_dataset(tmp_path / "a", 7, 16, 16, defect_ratio=0.3).n_defect == round(7 * 0.3)
    extreme = write_dataset(tmp_path / "b", 3, 16, 16, defect_ratio=0.01)
    assert (extreme.n_ok, extreme.n_defect) == (2, 1)


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "photos.txt").write_text("precious")
    with pytest.raises(ValueError, match="non-empty"):
        write_dataset(tmp_path, 4, 16, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["photos.txt"]
    (tmp_path / "synth.json").write_text('{"something": "else"}')  # not ours either
    with pytest.raises(ValueError, match="non-empty"):
        write_dataset(tmp_path, 4, 16, 16)
    a_file = tmp_path / "photos.txt"
    with pytest.raises(ValueError, match="not a directory"):
        write_dataset(a_file, 4, 16, 16)


def test_rewrites_its_own_folder_without_stale_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, 12, 16, 16, seed=0)
    (tmp_path / "notes.txt").write_text("kept")
    summary = write_dataset(tmp_path, 4, 16, 16, seed=1)
    names = _files(tmp_path, "ok") + _files(tmp_path, "defect")
    assert sorted(names) == [f"synth_{i:05d}.png" for i in range(4)]
    assert len(_files(tmp_path, "masks")) == summary.n_defect
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert json.loads((tmp_path / "synth.json").read_text())["seed"] == 1


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    assert write_dataset(tmp_path, 2, 16, 16).n_defect == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 1}, "at least 2"),
        ({"n": 0}, "at least 2"),
        ({"width": 15}, "width and height"),
        ({"height": 4}, "width and height"),
        ({"defect_ratio": 0.0}, "defect_ratio"),
        ({"defect_ratio": 1.0}, "defect_ratio"),
        ({"defect_ratio": -0.5}, "defect_ratio"),
        ({"defect_ratio": math.nan}, "defect_ratio"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"n": 4, "width": 16, "height": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":  # rough speed check for the synthetic camera: python tests/test_synth.py
    rng = np.random.default_rng(0)
    render(rng, 752, 480, True)
    start = time.perf_counter()
    for k in range(20):
        render(rng, 752, 480, k % 2 == 0)
    print(f"752x480 render: {(time.perf_counter() - start) / 20 * 1000:.1f} ms")
