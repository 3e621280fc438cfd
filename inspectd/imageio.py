"""Reading images and videos the same way everywhere (RGB uint8, grey replicated to 3 channels), and the
one JPEG/PNG encoder every output uses (events, archive, live view, infer, watch, synth)."""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "read_rgb", "to_rgb", "encode_jpeg", "encode_png", "write_png", "parse_size"]

from pathlib import Path

import cv2
import numpy as np

from inspectd.errors import DataError, NoInputError, UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".ts"})


def to_rgb(image: np.ndarray, bgr: bool = True) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 RGB uint8 (grey is replicated)."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image
    raise DataError(f"unsupported image shape {image.shape}: expected grey, RGB or RGBA")


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to HxWx3 RGB uint8; one-line errors for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"{path}: no such image file")
    # imdecode(fromfile) rather than imread: works for non-ASCII paths and never returns a
    # silently empty image without us noticing.
    data = np.fromfile(str(path), dtype=np.uint8)
    image: np.ndarray | None = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    return to_rgb(image)


def _encode(suffix: str, image: np.ndarray, rgb: bool, params: list[int]) -> bytes:
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb and image.ndim == 3 else image
    ok, buf = cv2.imencode(suffix, out, params)
    if not ok:  # OpenCV refuses only what is not an image (a wrong dtype or shape): a bug of ours, not bad input
        raise ValueError(f"cannot encode a {image.dtype} array of shape {image.shape} as {suffix}")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 85, rgb: bool = True) -> bytes:
    """An RGB (rgb=False: BGR, as OpenCV draws) or grey uint8 image as JPEG bytes."""
    return _encode(".jpg", image, rgb, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])


def encode_png(image: np.ndarray, rgb: bool = True) -> bytes:
    """An RGB (rgb=False: BGR) or grey uint8 image as PNG bytes, lossless."""
    return _encode(".png", image, rgb, [])


def write_png(path: Path, image: np.ndarray, rgb: bool = True) -> None:
    """Write an RGB (rgb=False: BGR) or grey uint8 image as PNG."""
    Path(path).write_bytes(encode_png(image, rgb))


def parse_size(text: str) -> tuple[int, int]:
    """'752x480' -> (752, 480) as (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 752x480") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"size {text!r}: width and height must be positive")
    return w, h
