"""Dataset layout (DATASET/ok|defect, aliases 0|1 and good|bad, optional masks/) and splits."""

from __future__ import annotations

__all__ = ["CLASS_DIRS", "Item", "Dataset", "class_items", "scan", "stratified_split"]

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspectd.errors import DataError, NoInputError
from inspectd.imageio import IMAGE_SUFFIXES

# folder name -> label (0 = ok, 1 = defect); several spellings are accepted, one per class.
CLASS_DIRS = {"ok": 0, "good": 0, "0": 0, "defect": 1, "bad": 1, "1": 1}
LABEL_NAMES = ("ok", "defect")


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    mask: Path | None = None


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: tuple[Item, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {name: int((labels == i).sum()) for i, name in enumerate(LABEL_NAMES)}

    @property
    def has_masks(self) -> bool:
        return any(it.mask is not None for it in self.items)

    def subset(self, index: Iterable[int]) -> Dataset:
        return Dataset(self.root, tuple(self.items[i] for i in index))

    def describe(self) -> str:
        c = self.counts()
        n = max(1, len(self.items))
        return f"{len(self.items)} images: {c['ok']} ok, {c['defect']} defect ({100 * c['defect'] / n:.1f} % defect)"


def _class_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        label = CLASS_DIRS.get(child.name.lower())
        if label is None:
            continue
        if label in found:
            raise DataError(
                f"{root}: both {found[label].name}/ and {child.name}/ hold class {LABEL_NAMES[label]!r}; keep one of them"
            )
        found[label] = child
    return found


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_items(root: Path) -> list[Item]:
    """The images of root's class folders with their labels (and masks/ for defects); [] without class folders."""
    masks_dir = root / "masks"
    items: list[Item] = []
    for label, folder in sorted(_class_dirs(root).items()):
        for path in _images(folder):
            mask = masks_dir / f"{path.stem}.png" if label == 1 else None
            items.append(Item(path, label, mask if mask is not None and mask.is_file() else None))
    return items


def scan(root: Path, require_both: bool = True) -> Dataset:
    """List a dataset folder; one-line errors for a missing folder, class or image."""
    root = Path(root)
    if not root.is_dir():
        raise NoInputError(f"{root}: no such dataset folder")
    if not _class_dirs(root):
        raise DataError(f"{root}: no class folders; expected ok/ and defect/ (or 0/ 1/, good/ bad/)")
    items = class_items(root)
    ds = Dataset(root, tuple(items))
    counts = ds.counts()
    missing = [name for name in LABEL_NAMES if counts[name] == 0]
    if not items:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    if require_both and missing:
        raise DataError(
            f"{root}: class {missing[0]!r} has no images ({ds.describe()}); a binary classifier needs both ok and defect examples"
        )
    return ds


def stratified_split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split keeping the class ratio; every class keeps at least one image on each side."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    labels = ds.labels
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            raise DataError(
                f"{ds.root}: class {LABEL_NAMES[label]!r} has {len(idx)} image(s); a validation split "
                "needs at least 2 per class (or pass --val DATASET)"
            )
        idx = rng.permutation(idx)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    return ds.subset(sorted(train_idx)), ds.subset(sorted(val_idx))
