"""`inspectd infer`: images, folders and video files -> overlay PNG, mask PNG and a results.jsonl line each.

A folder is read as a dataset too (the layout `train` and `evaluate` take): the images in its class
folders (ok/ defect/, aliases 0/ 1/, good/ bad/; never masks/) are inferred as well as those at its
top, and a class folder's label (0 ok, 1 defect) is recorded as `label`. MODEL may be `builtin:demo`.
"""

from __future__ import annotations

__all__ = ["InferOptions", "infer", "raise_if_skipped"]

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inspectd.errors import DataError, NoInputError, UsageError
from inspectd.frames import published_probability
from inspectd.imageio import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_rgb, to_rgb, write_png
from inspectd.model.deployable import load_model, resolve_model_path
from inspectd.pipeline.engine import Predictor
from inspectd.pipeline.postprocess import MaskRule, locate, overlay, to_mask_u8
from inspectd.toolkit.dataset import class_items


@dataclass(frozen=True)
class InferOptions:
    model: Path | str  # a .keras file, or "builtin:demo"
    inputs: tuple[Path, ...]
    out: Path
    batch_size: int = 8
    every_s: float = 1.0  # video: one frame per this many seconds of video
    max_frames: int = 0  # video: 0 = no limit
    threshold: float | None = None  # None = the model's own
    mask_threshold: float | None = None  # shorthand for mask_rule probability:VALUE
    mask_rule: str | None = None  # e.g. "relative:2"; None = the model's own rule
    map_mode: str = "relative"  # the overlays' map (inspectd.drawing.MAP_MODES)


@dataclass(frozen=True)
class _Key:
    input: Path
    name: str
    frame: int | None = None
    label: int | None = None  # from the dataset class folder the image is in


@dataclass(frozen=True)
class _Input:
    path: Path
    label: int | None = None


def _folder(path: Path) -> list[_Input]:
    """The images and videos at the top of a folder, then those of its class folders, labelled."""
    loose = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    return [_Input(p) for p in loose] + [_Input(it.path, it.label) for it in class_items(path)]


def _expand(inputs: tuple[Path, ...]) -> list[_Input]:
    files: list[_Input] = []
    for path in inputs:
        if path.is_dir():
            files += _folder(path)
        elif path.is_file():
            files.append(_Input(path))
        else:
            raise NoInputError(f"{path}: no such file or folder")
    if not files:
        raise DataError(
            f"no images or videos in {', '.join(map(str, inputs))} (nor in class folders ok/ defect/, 0/ 1/, good/ bad/)"
        )
    return files


def _unique(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def _video_frames(path: Path, name: str, opts: InferOptions) -> Iterator[tuple[_Key, np.ndarray]]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError(f"{path}: not a readable video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(1, round(fps * opts.every_s))
    index = taken = 0
    try:
        while opts.max_frames <= 0 or taken < opts.max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if index % step == 0:
                taken += 1
                yield _Key(path, f"{name}_f{index:06d}", index), to_rgb(frame)
            index += 1
    finally:
        cap.release()
    if taken == 0:
        raise DataError(f"{path}: no frames could be decoded")


def _items(files: list[_Input], opts: InferOptions, errors: list[dict]) -> Iterator[tuple[_Key, np.ndarray]]:
    used: set[str] = set()
    for item in files:
        path = item.path
        name = _unique(path.stem, used)
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                yield from _video_frames(path, name, opts)
            else:
                yield _Key(path, name, label=item.label), read_rgb(path)
        except DataError as exc:
            # One bad file must not cost the results of all the others: report it and go on.
            print(f"inspectd infer: skipped: {exc}", file=sys.stderr)
            errors.append({"input": str(path), "error": str(exc)})


def _record(key: _Key, image: np.ndarray, pred, out: Path, thr: float, rule: MaskRule, map_mode: str) -> dict:
    h, w = image.shape[:2]
    found = locate(pred.cam_logits, w, h, rule, pred.score >= thr)  # as the daemon does
    mask = found.kept > 0 if found.regions and found.kept is not None else None  # regions: kept is not None
    picture = overlay(image, found.logits, pred.score, thr, found.mask_logit, mask, found.regions, map_mode)
    write_png(out / f"{key.name}_overlay.png", picture)
    write_png(out / f"{key.name}_mask.png", to_mask_u8(found.prob), rgb=False)
    if found.kept is not None:  # defects: exactly the regions (the 8-bit probability can saturate above the threshold)
        write_png(out / f"{key.name}_regions.png", found.kept, rgb=False)
    else:  # judged ok: no regions file, not one left from an earlier run into the same folder
        (out / f"{key.name}_regions.png").unlink(missing_ok=True)
    record = {
        "input": str(key.input),
        "name": key.name,
        "score": published_probability(pred.score),
        "threshold": published_probability(thr),
        "is_defect": bool(pred.score >= thr),
        "mask_threshold": published_probability(found.mask_threshold),
        "mask_rule": str(rule),
        "regions": [r.as_dict() for r in found.regions],
    }
    if key.frame is not None:
        record["frame"] = key.frame
    if key.label is not None:
        record["label"] = key.label
    return record


# Beyond this factor between an image and the model input, the defects are resized past what the model
# learned (a 4x shrink turns a 8 px crack into 2 px): say so once.
SCALE_WARNING = 4.0


def _warn_scale(key: _Key, image: np.ndarray, model_size: tuple[int, int], warned: set) -> None:
    h, w = image.shape[:2]
    factor = max(w / model_size[0], h / model_size[1], model_size[0] / w, model_size[1] / h)
    kind = "larger" if w * h > model_size[0] * model_size[1] else "smaller"
    if factor >= SCALE_WARNING and kind not in warned:
        warned.add(kind)
        print(
            f"inspectd infer: warning: {key.name} is {w}x{h}, {factor:.0f}x {kind} than the model's input "
            f"{model_size[0]}x{model_size[1]}; images are resized to it, so small defects may vanish (or noise "
            "grow); crop or resize the images, or train a model at their size (said once)",
            file=sys.stderr,
        )


def _mask_rule(opts: InferOptions, model) -> MaskRule:
    """--mask-rule, else --mask-threshold (a fixed probability), else the model's own rule."""
    if opts.mask_rule is not None and opts.mask_threshold is not None:
        raise UsageError("give --mask-rule or --mask-threshold, not both")
    try:
        if opts.mask_rule is not None:
            return MaskRule.parse(opts.mask_rule)
        return model.mask_rule if opts.mask_threshold is None else MaskRule("probability", opts.mask_threshold)
    except ValueError as exc:
        raise UsageError(f"--mask-rule/--mask-threshold: {exc}") from None


def infer(opts: InferOptions) -> tuple[int, int]:
    """Run the model over every input; returns (images written, inputs skipped)."""
    if opts.batch_size < 1:
        raise UsageError("--batch-size must be positive")
    files = _expand(opts.inputs)
    model = load_model(resolve_model_path(str(opts.model)))
    thr = model.threshold if opts.threshold is None else opts.threshold
    rule = _mask_rule(opts, model)
    opts.out.mkdir(parents=True, exist_ok=True)
    errors: list[dict] = []
    written = 0
    with open(opts.out / "results.jsonl", "w") as results:
        warned: set = set()
        for key, image, pred in Predictor(model, opts.batch_size).stream(_items(files, opts, errors)):
            _warn_scale(key, image, model.input_size, warned)
            results.write(json.dumps(_record(key, image, pred, opts.out, thr, rule, opts.map_mode)) + "\n")
            results.flush()
            written += 1
            print(f"inspectd infer: {key.name}: score {pred.score:.3f}", file=sys.stderr)
        for err in errors:
            results.write(json.dumps(err) + "\n")
    return written, len(errors)


def raise_if_skipped(skipped: int) -> None:
    if skipped:
        raise DataError(f"{skipped} input(s) could not be read (see results.jsonl); the others were written")
