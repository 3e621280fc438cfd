"""Deterministic synthetic defect images: textured grey surfaces, lighting, and labelled defects.

Used by ``inspectd synth`` to write a dataset (``ok/``, ``defect/``, ``masks/``, ``synth.json``) and
by the daemon's synthetic camera, so it imports only numpy, OpenCV and the standard library.

A render draws a *scene* (surface texture, illumination, sensor noise) and the *defects* from two
generators derived from the caller's one, so the same generator state rendered with
``defect=False`` gives exactly the same frame minus the defects. Good and defective samples
therefore share one distribution of surfaces and lighting. Defect sizes are fractions of
``min(width, height)`` with a floor of 1-2 px; contrast is 25-90 grey levels relative to the lit
surface; the mask is the defect's alpha thresholded at 0.5.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inspectd.imageio import write_png

__all__ = ["SURFACES", "DEFECTS", "Sample", "DatasetSummary", "render", "write_dataset"]

SURFACES = ("metal", "cast", "fabric", "gradient")
DEFECTS = ("scratch", "crack", "spot", "blob")

_MIN_SIDE = 16
_CONTRAST = (25.0, 90.0)  # grey levels, relative to the local lit surface
_GENERATOR = "inspectd.synth"
_FORMAT = 1
_CLASS_DIRS = ("ok", "defect", "masks")


@dataclass(frozen=True, eq=False)
class Sample:
    """One rendered frame: grey image, 0/255 defect mask, and what was drawn."""

    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray  # (H, W) uint8, 255 = defect pixel
    defect: bool
    surface: str
    kinds: tuple[str, ...]  # one entry per defect drawn, in drawing order; () for good samples


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`write_dataset` wrote."""

    root: Path
    n_ok: int
    n_defect: int
    width: int
    height: int
    seed: int


# --------------------------------------------------------------------------------- surfaces


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zero-mean unit-variance float32 noise (triangular; ~2.5x cheaper than standard_normal)."""
    a = rng.random((h, w), dtype=np.float32)
    a -= rng.random((h, w), dtype=np.float32)
    a *= np.float32(math.sqrt(6.0))
    return a


def _lowfreq(rng: np.random.Generator, w: int, h: int, cells: float) -> np.ndarray:
    """Smooth noise of about unit amplitude, `cells` undulations across the short side."""
    m = min(w, h)
    grid = rng.standard_normal((max(2, round(cells * h / m)) + 1, max(2, round(cells * w / m)) + 1))
    return cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _metal(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Brushed metal: noise smeared along one direction, plus faint bands across it."""
    m = min(w, h)
    if rng.random() < 0.5:  # often machined along an axis, sometimes anywhere
        theta = rng.choice([0.0, math.pi / 2]) + rng.normal(0.0, 0.03)
    else:
        theta = rng.uniform(0.0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    cw = int(math.ceil(w * abs(c) + h * abs(s))) + 4
    ch = int(math.ceil(w * abs(s) + h * abs(c))) + 4
    k = max(3, int(cw * rng.uniform(0.04, 0.25)))
    canvas = cv2.blur(_noise(rng, ch, cw), (k, 1))
    canvas = cv2.blur(canvas, (k, 1)) * (rng.uniform(3.0, 8.0) / canvas.std())
    band: np.ndarray = rng.standard_normal((ch, 1), dtype=np.float32)
    band = cv2.GaussianBlur(band, (1, 0), m * rng.uniform(0.005, 0.04))  # bands across the grain
    canvas += band * (rng.uniform(1.5, 6.0) / max(float(band.std()), 1e-6))
    # Sample the canvas along the rotated axes (inverse map: output pixel -> canvas pixel).
    rot = np.array([[c, s, cw / 2 - c * w / 2 - s * h / 2], [-s, c, ch / 2 + s * w / 2 - c * h / 2]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(canvas, rot, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT)
    return out + np.float32(rng.uniform(100.0, 175.0))


def _cast(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Cast / sand-blasted: fine granular noise over low-frequency blotches."""
    grain: np.ndarray = cv2.GaussianBlur(_noise(rng, h, w), (0, 0), rng.uniform(0.6, 1.4))
    grain *= rng.uniform(4.0, 11.0) / max(float(grain.std()), 1e-6)
    blotch = _lowfreq(rng, w, h, rng.uniform(2.5, 6.0)) * rng.uniform(5.0, 14.0)
    blotch += _lowfreq(rng, w, h, rng.uniform(10.0, 20.0)) * rng.uniform(1.5, 4.0)
    return grain + blotch + np.float32(rng.uniform(85.0, 165.0))


def _fabric(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Plain weave: threads crossing over/under, slightly wavy, random angle and period."""
    m = min(w, h)
    p = max(3.0, m * rng.uniform(0.015, 0.05))
    q = p * rng.uniform(0.8, 1.25)
    theta = rng.uniform(0.0, math.pi)
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    c, s = math.cos(theta), math.sin(theta)
    u = (x * c + y * s) + _lowfreq(rng, w, h, 2.0) * (0.4 * p)
    v = (y * c - x * s) + _lowfreq(rng, w, h, 2.0) * (0.4 * q)
    cu, cv_ = np.cos(u * np.float32(math.pi / p)), np.cos(v * np.float32(math.pi / q))
    over = np.clip(cu * cv_ * 3.0, -1.0, 1.0) * 0.5 + 0.5  # 1 where the warp lies on top
    weave = over * cu * cu + (1.0 - over) * cv_ * cv_  # thread profile across the top thread
    fuzz = cv2.GaussianBlur(_noise(rng, h, w), (0, 0), 0.7)
    out = (weave - 0.5) * rng.uniform(14.0, 34.0) + fuzz * rng.uniform(3.0, 8.0)
    out += _lowfreq(rng, w, h, 3.0) * rng.uniform(1.0, 5.0)
    return out + np.float32(rng.uniform(85.0, 165.0))


def _gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth painted / plastic surface: a ramp and gentle undulation, almost no texture."""
    y, x = np.ogrid[0:h, 0:w]
    a = rng.uniform(0.0, 2 * math.pi)
    ramp = ((x - w / 2) * math.cos(a) + (y - h / 2) * math.sin(a)) / max(w, h)
    out = _lowfreq(rng, w, h, rng.uniform(1.0, 3.0)) * rng.uniform(3.0, 10.0)
    out += (ramp * rng.uniform(10.0, 45.0)).astype(np.float32)
    out += _noise(rng, h, w) * rng.uniform(0.3, 1.2)
    return out + np.float32(rng.uniform(90.0, 170.0))


_SURFACE_FNS = {"metal": _metal, "cast": _cast, "fabric": _fabric, "gradient": _gradient}


def _lighting(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Gain/offset, linear illumination gradient, off-centre vignette, soft sensor response."""
    h, w = img.shape
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    gx, gy = (float(v) for v in rng.normal(0.0, 0.12, 2))  # Python floats keep float32 maths
    cx, cy = (float(v) for v in rng.uniform(-0.4, 0.4, 2))
    vignette = 1.0 - rng.uniform(0.0, 0.35) * ((x - cx) ** 2 + (y - cy) ** 2) / 2.0
    light = (rng.uniform(0.8, 1.15) * (1.0 + gx * x + gy * y)) * vignette
    out = img * light + np.float32(rng.uniform(-12.0, 12.0))
    return (128.0 + 112.0 * np.tanh((out - 128.0) / 112.0)).astype(np.float32)


# ---------------------------------------------------------------------------------- defects


def _polyline(canvas: np.ndarray, pts: np.ndarray, thickness: int) -> None:
    """Anti-aliased open polyline with sub-pixel vertices (OpenCV fixed point, 4 fraction bits)."""
    fixed = np.round(pts * 16).astype(np.int32)
    cv2.polylines(canvas, [fixed], False, 255, thickness, cv2.LINE_AA, 4)


def _scratch(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, float, int]:
    """Thin straight or gently bowed line, 15-50 % of the short side, bright or dark."""
    m, canvas = min(w, h), np.zeros((h, w), np.uint8)
    length, a = m * rng.uniform(0.15, 0.5), rng.uniform(0.0, math.pi)
    centre = rng.uniform(0.1, 0.9, 2) * (w, h)
    bend = length * rng.uniform(-0.15, 0.15) if rng.random() < 0.6 else 0.0
    t = np.linspace(-0.5, 0.5, 24)[:, None]
    along, across = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    pts = centre + t * length * along + (1.0 - 4.0 * t * t) * bend * across
    thickness = max(int(rng.integers(1, 3)), round(m * rng.uniform(0.002, 0.01)))
    _polyline(canvas, pts, thickness)
    return canvas, 0.0, int(rng.choice([-1, 1]))


def _walk(
    rng: np.random.Generator,
    canvas: np.ndarray,
    p: np.ndarray,
    heading: float,
    length: float,
    step: float,
    thickness: int,
    depth: int,
) -> None:
    """Jagged random-walk polyline that may fork (recursively, `depth` levels)."""
    pts, h0 = [p], heading
    for _ in range(max(2, int(length / step))):
        heading = h0 + 0.6 * (heading - h0) + rng.normal(0.0, 0.5)
        p = p + step * np.array([math.cos(heading), math.sin(heading)])
        pts.append(p)
        if depth > 0 and rng.random() < 0.12:
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
            _walk(rng, canvas, p, heading + turn, length * rng.uniform(0.2, 0.5), step, max(1, thickness - 1), depth - 1)
    _polyline(canvas, np.array(pts), thickness)


def _crack(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, float, int]:
    """Dark branching crack, 15-45 % of the short side."""
    m, canvas = min(w, h), np.zeros((h, w), np.uint8)
    thickness = max(1, round(m * rng.uniform(0.002, 0.007)))
    start = rng.uniform(0.15, 0.85, 2) * (w, h)
    _walk(
        rng,
        canvas,
        start,
        rng.uniform(0.0, 2 * math.pi),
        m * rng.uniform(0.15, 0.45),
        max(1.5, m * rng.uniform(0.02, 0.04)),
        thickness,
        2,
    )
    return canvas, 0.0, -1


def _spot(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, float, int]:
    """Small round pit or speck, 4-12 % of the short side across (at least 3 px)."""
    m, canvas = min(w, h), np.zeros((h, w), np.uint8)
    r = max(1.5, m * rng.uniform(0.02, 0.06))
    c = rng.uniform((r, r), (w - r, h - r))
    centre = (int(round(c[0] * 16)), int(round(c[1] * 16)))
    cv2.circle(canvas, centre, round(r * 16), 255, -1, cv2.LINE_AA, 4)
    return canvas, 0.2 * r, int(rng.choice([-1, 1]))


def _blob(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, float, int]:
    """Irregular stain: a perturbed ellipse, 6-15 % of the short side, with a soft edge."""
    m, canvas = min(w, h), np.zeros((h, w), np.uint8)
    a = max(2.0, m * rng.uniform(0.03, 0.075))
    b = max(1.5, a * rng.uniform(0.45, 1.0))
    t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
    rho = np.ones_like(t)
    for k in range(2, 6):
        rho += rng.uniform(0.0, 0.3 / k) * np.cos(k * t + rng.uniform(0.0, 2 * math.pi))
    phi, c = rng.uniform(0.0, math.pi), rng.uniform(0.15, 0.85, 2) * (w, h)
    ex, ey = a * rho * np.cos(t), b * rho * np.sin(t)
    cp, sp = math.cos(phi), math.sin(phi)
    pts = np.stack([ex * cp - ey * sp, ex * sp + ey * cp], axis=1) + c
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    return canvas, max(0.5, a * rng.uniform(0.08, 0.25)), int(rng.choice([-1, 1]))


_DEFECT_FNS = {"scratch": _scratch, "crack": _crack, "spot": _spot, "blob": _blob}


def _delta(level: float, contrast: float, sign: int) -> float:
    """Signed change for a defect on a surface at `level`: flip or shrink it rather than clip."""
    room = {1: 250.0 - level, -1: level - 5.0}
    if room[sign] < contrast and room[-sign] > room[sign]:
        sign = -sign
    return sign * max(_CONTRAST[0], min(contrast, room[sign]))


def _stamp(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, used: np.ndarray, kind: str, low: float) -> bool:
    """Draw one defect of `kind` (contrast >= `low`) into img, mask and `used` (its footprint).

    Returns False, changing nothing, if it has no alpha >= 0.5 core or would touch an earlier
    defect: overlaps could cancel or add up and so break the mask's alpha >= 0.5 meaning.
    """
    h, w = img.shape
    canvas, soft, sign = _DEFECT_FNS[kind](rng, w, h)
    x, y, bw, bh = cv2.boundingRect(canvas)
    if bw == 0 or bh == 0:
        return False
    pad = int(math.ceil(3.0 * soft)) + 1
    roi = np.s_[max(0, y - pad) : min(h, y + bh + pad), max(0, x - pad) : min(w, x + bw + pad)]
    alpha: np.ndarray = canvas[roi].astype(np.float32) * np.float32(1.0 / 255.0)
    if soft > 0.0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), soft)
    core, touched = alpha >= 0.5, alpha > 0.01
    if not core.any() or (used[roi] & touched).any():
        return False
    low = max(low, 35.0) if kind == "crack" else low
    delta = _delta(float(img[roi][core].mean()), rng.uniform(low, _CONTRAST[1]), sign)
    img[roi] += alpha * np.float32(delta)
    mask[roi][core] = 255
    used[roi] |= touched
    return True


def _add_defects(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> tuple[str, ...]:
    """One to three separate defects of random kinds (a draw that fails is redrawn a few times)."""
    # Busy textures get a higher contrast floor so a 1 px line never drowns in the grain.
    texture_sd = float(np.std(img - cv2.GaussianBlur(img, (0, 0), 2.0)))
    low = max(_CONTRAST[0], min(60.0, 2.5 * texture_sd))
    kinds: list[str] = []
    used = np.zeros(img.shape, bool)
    for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
        for attempt in range(8):  # the first defect always lands: a spot at worst
            kind = "spot" if attempt == 7 else DEFECTS[int(rng.integers(len(DEFECTS)))]
            if _stamp(rng, img, mask, used, kind, low):
                kinds.append(kind)
                break
    return tuple(kinds)


# ----------------------------------------------------------------------------------- render


def _check_size(width: int, height: int) -> None:
    if int(width) < _MIN_SIDE or int(height) < _MIN_SIDE:
        raise ValueError(f"image size {width}x{height}: width and height must be >= {_MIN_SIDE}")


def render(rng: np.random.Generator, width: int, height: int, defect: bool) -> Sample:
    """Render one (height, width) grey frame; with `defect`, draw 1-3 defects and their mask.

    The scene and the defects come from two generators seeded from `rng`, so rendering the same
    generator state with defect=False gives the identical frame without the defects.
    """
    _check_size(width, height)
    width, height = int(width), int(height)
    scene_rng, defect_rng = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=2))
    surface = SURFACES[int(scene_rng.integers(len(SURFACES)))]
    img = _lighting(scene_rng, _SURFACE_FNS[surface](scene_rng, width, height))
    noise = _noise(scene_rng, height, width)
    read_sd, shot = scene_rng.uniform(0.8, 3.0), scene_rng.uniform(0.0, 0.03)
    mask = np.zeros((height, width), np.uint8)
    kinds = _add_defects(defect_rng, img, mask) if defect else ()
    img += noise * np.sqrt(np.float32(read_sd**2) + np.float32(shot) * np.clip(img, 0.0, 255.0))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Sample(image=image, mask=mask, defect=bool(defect), surface=surface, kinds=kinds)


# ---------------------------------------------------------------------------------- dataset


def _validate(n: int, width: int, height: int, seed: int, defect_ratio: float) -> None:
    if int(n) < 2:
        raise ValueError(f"n={n}: a dataset needs at least 2 images (one ok, one defect)")
    _check_size(width, height)
    if not 0.0 < float(defect_ratio) < 1.0:
        raise ValueError(f"defect_ratio={defect_ratio}: must be strictly between 0 and 1")
    if int(seed) < 0:
        raise ValueError(f"seed={seed}: must be a non-negative integer")


def _is_ours(meta: Path) -> bool:
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("generator") == _GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _prepare(out: Path) -> None:
    """Create `out`, refusing a foreign non-empty folder; clear images a previous run left."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_ours(out / "synth.json"):
            raise ValueError(f"{out}: refusing to write into a non-empty folder without synth.json")
        for sub in _CLASS_DIRS:  # stale files could otherwise land in both classes
            for old in (out / sub).glob("synth_*.png"):
                old.unlink()
    for sub in _CLASS_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)


def _write_meta(out: Path, meta: dict, samples: list[dict], complete: bool) -> None:
    text = json.dumps({**meta, "complete": complete, "samples": samples}, indent=1)
    (out / "synth.json").write_text(text + "\n", encoding="utf-8")


def write_dataset(
    out: Path,
    n: int,
    width: int,
    height: int,
    seed: int = 0,
    defect_ratio: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetSummary:
    """Write n samples to out/ok, out/defect and out/masks as synth_%05d.png, plus out/synth.json.

    round(n * defect_ratio) samples are defects (kept within 1..n-1 so both classes exist), at
    indices chosen by a seeded permutation. Sample i is rendered from
    SeedSequence(seed).spawn(n)[i], so it does not depend on n. `progress(done, total)` is called
    after each image.
    """
    out, n, width, height, seed = Path(out), int(n), int(width), int(height), int(seed)
    _validate(n, width, height, seed, defect_ratio)
    _prepare(out)
    n_defect = min(n - 1, max(1, round(n * defect_ratio)))
    is_defect = np.zeros(n, bool)
    is_defect[np.random.default_rng(seed).permutation(n)[:n_defect]] = True
    meta = {
        "generator": _GENERATOR,
        "format": _FORMAT,
        "n": n,
        "n_ok": n - n_defect,
        "n_defect": n_defect,
        "width": width,
        "height": height,
        "seed": seed,
        "defect_ratio": float(defect_ratio),
        "surfaces": list(SURFACES),
        "defects": list(DEFECTS),
    }
    _write_meta(out, meta, [], complete=False)  # marks the folder as ours even if interrupted
    samples = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        s = render(np.random.default_rng(child), width, height, bool(is_defect[i]))
        name = f"synth_{i:05d}.png"
        write_png(out / ("defect" if s.defect else "ok") / name, s.image, rgb=False)
        if s.defect:
            write_png(out / "masks" / name, s.mask, rgb=False)
        samples.append({"file": f"{'defect' if s.defect else 'ok'}/{name}", "surface": s.surface, "kinds": list(s.kinds)})
        if progress is not None:
            progress(i + 1, n)
    _write_meta(out, meta, samples, complete=True)
    return DatasetSummary(root=out, n_ok=n - n_defect, n_defect=n_defect, width=width, height=height, seed=seed)
