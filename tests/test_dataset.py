"""Dataset layout: class folder aliases, masks, one-line errors, stratified split."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.errors import DataError, NoInputError
from inspectd.toolkit.dataset import scan, stratified_split


def _make(root, layout: dict[str, int], masks: bool = False):
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / folder / f"{folder}_{i}.png").write_bytes(b"x")
    if masks:
        (root / "masks").mkdir()
        for p in (root / "defect").iterdir():
            (root / "masks" / p.name).write_bytes(b"m")
    return root


@pytest.mark.parametrize("ok,bad", [("ok", "defect"), ("0", "1"), ("good", "bad")])
def test_aliases(tmp_path, ok, bad):
    ds = scan(_make(tmp_path, {ok: 3, bad: 2}))
    assert ds.counts() == {"ok": 3, "defect": 2}


def test_masks_attached_to_defects_only(tmp_path):
    ds = scan(_make(tmp_path, {"ok": 2, "defect": 2}, masks=True))
    assert ds.has_masks
    assert all((it.mask is not None) == (it.label == 1) for it in ds.items)


def test_errors(tmp_path):
    with pytest.raises(NoInputError):
        scan(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        scan(tmp_path)
    _make(tmp_path, {"ok": 2, "good": 1})
    with pytest.raises(DataError, match="both"):
        scan(tmp_path)


def test_split_is_stratified_and_disjoint(tmp_path):
    ds = scan(_make(tmp_path, {"ok": 40, "defect": 10}))
    train, val = stratified_split(ds, 0.2, seed=0)
    assert val.counts() == {"ok": 8, "defect": 2} and train.counts() == {"ok": 32, "defect": 8}
    assert not {it.path for it in train.items} & {it.path for it in val.items}
    again, _ = stratified_split(ds, 0.2, seed=0)
    assert again == train  # the seed decides the split...
    other, _ = stratified_split(ds, 0.2, seed=1)
    assert other != train  # ...and it is drawn from it, not fixed
    with pytest.raises(DataError, match="at least 2 per class"):
        stratified_split(scan(_make(tmp_path / "x", {"ok": 5, "defect": 1})), 0.2, 0)
    assert np.array_equal(ds.labels[:40], np.zeros(40))
