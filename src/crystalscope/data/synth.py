"""Synthetic stand-in for the OpenCrystalData cephalexin crops (CEX needles vs PG agglomerates).

The real dataset (Kaggle, 1.48 GB, CC BY-SA 4.0) may not be at hand on an air-gapped plant
network or in CI, so :func:`generate` writes a stand-in with the same *structure*:

- the Kaggle layout ``OUT_DIR/cropped/cropped/{cex,pg}/{CEX,PG} (i).png``, numbered from 1,
  with the real counts by default (6,860 CEX and 6,804 PG);
- CEX crops exactly 151 x 151 RGB (grey: the three channels are equal, as in the real files):
  a haze of broad out-of-focus needles, often a broad bright rod speckled with grains, near-black
  gaps, all soft at the pixel scale like the real crops (issue 17; ``benchmarks/realism.py``);
- PG crops of a size drawn per crystal (130-230 px a side, rarely square): one roundish,
  ragged agglomerate of bright granules (sometimes fibrous), in a soft needle haze, often with
  needles behind or in front of it,
  written as a group of 3-5 pixel-exact dihedral views (rotations / mirrors) under
  consecutive numbers, exactly like the augmentation groups of the real PG folder;
- a ground-truth ``OUT_DIR/synth_manifest.csv`` (``path,class,crystal_id,view``) *outside*
  ``cropped/cropped/`` so the duplicate audit can be scored without a split ever seeing it.

Every crystal is drawn from its own random generator derived from ``(seed, class, crystal
index)``, so the files are byte-identical for a seed whatever the number of worker processes.
Only numpy and Pillow are needed (the generator is part of the core install).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crystalscope.errors import CrystalscopeError
from crystalscope.io import atomic_dir
from crystalscope.runtime import cpu_count, default_workers, run_chunks
from crystalscope.safety import check_output, claim_output

#: Real file counts of the Kaggle download (``archive/cropped/cropped/{cex,pg}``).
REAL_COUNTS = {"cex": 6860, "pg": 6804}
#: Every real CEX crop is 151 x 151 px.
CEX_SIDE = 151
#: Range of real PG crop sides in px (both ends included).
PG_SIDE_RANGE = (130, 230)
#: File-name prefix per class folder (``cex/CEX (1).png``).
FILE_PREFIX = {"cex": "CEX", "pg": "PG"}
#: Sub-folder of OUT_DIR that mirrors the unzipped Kaggle archive.
KAGGLE_SUBDIR = Path("cropped") / "cropped"
MANIFEST_NAME = "synth_manifest.csv"
COMMAND = "synth"  # named in the output's manifest: --force replaces only what a synth wrote
MANIFEST_COLUMNS = ("path", "class", "crystal_id", "view")
PG_GROUP_SIZES = (3, 4, 5)

# Integer codes mixed into each crystal's SeedSequence; never change them (they fix the bytes).
_CLASS_CODE = {"cex": 1, "pg": 2}
_GROUP_PLAN_CODE = 99
# PNG settings are fixed so output bytes never depend on Pillow defaults; no metadata chunks.
_PNG_COMPRESS_LEVEL = 3

#: The eight symmetries of a rectangle-on-a-grid, applied to ``uint8 (H, W[, C])`` arrays.
#: They are pixel-exact (index permutations), as the real PG augmentation groups are.
DIHEDRAL_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "flip_lr": lambda a: a[:, ::-1],
    "flip_ud": lambda a: a[::-1, :],
    "transpose": lambda a: np.swapaxes(a, 0, 1),
    "antitranspose": lambda a: np.rot90(a, 2).swapaxes(0, 1),
}


@dataclass(frozen=True)
class Difficulty:
    """How much the two classes overlap (probabilities are per crystal).

    Attributes:
        cex_blob: chance a CEX crop also holds a granular blob (a PG-like look-alike).
        cex_granular_rod: chance a CEX rod is filled with granular texture (as real CEX rods).
        pg_needles_behind: chance of out-of-focus needles behind a PG agglomerate.
        pg_needles_front: chance of sharp needles crossing in front of a PG agglomerate.
        pg_faint: chance a PG agglomerate is dim and low-contrast.
        pg_small: chance a PG agglomerate is small or off-centre (more background shows).
        blur: range of the final defocus blur sigma in px.
        noise: range of the sensor-noise sigma in grey levels.
        contrast: range of the global contrast gain.
    """

    cex_blob: float
    cex_granular_rod: float
    pg_needles_behind: float
    pg_needles_front: float
    pg_faint: float
    pg_small: float
    blur: tuple[float, float]
    noise: tuple[float, float]
    contrast: tuple[float, float]


DIFFICULTIES: dict[str, Difficulty] = {
    # no overlap: pure needles vs pure agglomerates
    "easy": Difficulty(cex_blob=0.0, cex_granular_rod=0.0, pg_needles_behind=0.0,
                       pg_needles_front=0.0, pg_faint=0.0, pg_small=0.0,
                       blur=(0.5, 0.9), noise=(1.0, 2.5), contrast=(1.0, 1.15)),
    # calibrated: frozen efficientnet_lite0 features + logistic regression ~95 % (docs/synthetic.md)
    "realistic": Difficulty(cex_blob=0.5, cex_granular_rod=0.8, pg_needles_behind=0.6,
                            pg_needles_front=0.65, pg_faint=0.3, pg_small=0.45,
                            blur=(0.6, 1.6), noise=(1.5, 4.0), contrast=(0.8, 1.15)),
    "hard": Difficulty(cex_blob=0.65, cex_granular_rod=0.9, pg_needles_behind=0.8,
                       pg_needles_front=0.8, pg_faint=0.45, pg_small=0.55,
                       blur=(1.0, 2.6), noise=(3.0, 7.0), contrast=(0.6, 1.05)),
}


@dataclass(frozen=True)
class CrystalTask:
    """One crystal to draw: a CEX crop (one file) or a PG group (several files)."""

    class_name: str
    index: int          # crystal index within its class, from 0
    first_number: int   # file number of its first view, from 1
    n_views: int


# ---- random fields and layers --------------------------------------------------------------


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 0..1 float layer through Pillow's 8-bit blur (fast, deterministic).

    Pillow blurs only 8-bit modes; 1/255 steps of a layer's own range are far below the
    sensor noise added later.
    """
    if sigma <= 0.05:
        return layer
    img = Image.fromarray(np.clip(layer * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255.0


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in about -1..1: a few random control points, bicubic upsampling."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _granules(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Blob texture (z-scored blurred noise): its peaks are granules of about 2*sigma px."""
    noise = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    field = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(sigma)),
                       dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _needle_layer(rng: np.random.Generator, h: int, w: int, count: int, *,
                  widths: tuple[float, float], lengths: tuple[float, float],
                  brightness: tuple[float, float], bundle_share: float = 0.6,
                  supersample: int = 1) -> np.ndarray:
    """Straight needles/rods (0..1 layer) at many angles; most follow a few bundle directions.

    Real CEX crops show bundles of near-parallel needles plus strays; thick rods get bright
    edges and a dimmer core (the probe's phase contrast).
    """
    s = supersample
    img = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(img)
    bundles = rng.uniform(0, math.pi, size=rng.integers(1, 4))
    for _ in range(count):
        if rng.random() < bundle_share:
            angle = rng.choice(bundles) + rng.normal(0, 0.12)
        else:
            angle = rng.uniform(0, math.pi)
        length = rng.uniform(*lengths)
        cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
        width = rng.uniform(*widths)
        level = int(255 * rng.uniform(*brightness))
        ends = [((cx - dx) * s, (cy - dy) * s), ((cx + dx) * s, (cy + dy) * s)]
        if width >= 5 and rng.random() < 0.6:
            # a hollow-looking rod: dim core, two bright rims
            draw.line(ends, fill=level // 3, width=max(1, round(width * s)))
            nx, ny = -math.sin(angle) * width * s / 2, math.cos(angle) * width * s / 2
            for sign in (-1, 1):
                rim = [(x + sign * nx, y + sign * ny) for x, y in ends]
                draw.line(rim, fill=level, width=max(1, round(1.5 * s)))
        else:
            draw.line(ends, fill=level, width=max(1, round(width * s)))
    if s > 1:
        img = img.reduce(s)
    return np.asarray(img, dtype=np.float32) / 255.0


def _rod_layer(rng: np.random.Generator, h: int, w: int, count: int,
               granular: bool) -> np.ndarray:
    """A few broad bright rods (CEX crystals seen close up), optionally granular inside.

    A rod is drawn as a tight bundle of parallel strands of different brightness and
    length: the striations seen along real CEX rods.
    """
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        # the probe's flow aligns many rods; keep a bias towards one direction per crop
        angle = rng.uniform(0, math.pi) if rng.random() < 0.5 else math.pi / 2 + rng.normal(0, 0.25)
        ux, uy = math.cos(angle), math.sin(angle)
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        width = rng.uniform(18, 55)
        level = rng.uniform(0.7, 1.0)
        for offset in np.arange(-width / 2, width / 2, rng.uniform(2.0, 3.5)):
            length = rng.uniform(0.7, 1.8) * max(h, w)
            shift = rng.normal(0, 0.1) * length
            x0, y0 = cx - uy * offset + ux * shift, cy + ux * offset + uy * shift
            dx, dy = 0.5 * length * ux, 0.5 * length * uy
            strand = level * rng.uniform(0.55, 1.0)
            draw.line([(x0 - dx, y0 - dy), (x0 + dx, y0 + dy)], fill=int(255 * strand),
                      width=int(rng.integers(2, 5)))
    layer = _blur(np.asarray(img, dtype=np.float32) / 255.0, rng.uniform(0.8, 1.4))
    if granular:
        # real rods are speckled with bright grains of a few px
        texture = _granules(rng, h, w, rng.uniform(1.3, 2.4))
        layer = layer * np.clip(0.85 + 0.3 * texture, 0.45, 1.6)
    else:
        layer = layer * np.clip(0.9 + 0.12 * _granules(rng, h, w, 2.5), 0.0, 1.2)
    return layer


def _agglomerate(rng: np.random.Generator, h: int, w: int, *, centre: tuple[float, float],
                 radius: float, style: str) -> tuple[np.ndarray, np.ndarray]:
    """A ragged, roundish cluster of bright granules (the PG look).

    ``style`` is ``granular`` (bright distinct granules), ``saturated`` (a flat white core
    with a granular rim, the probe's overexposure) or ``faint`` (dim, low contrast, with a
    brighter outline). Returns ``(brightness, coverage)``: a 0..~1.3 layer and the 0..1
    occupancy used to darken what lies behind it.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    # an elongated, tilted outline: stretch one axis before measuring the radius
    tilt, squash = rng.uniform(0, math.pi), rng.uniform(0.7, 1.0)
    along = dx * math.cos(tilt) + dy * math.sin(tilt)
    across = (-dx * math.sin(tilt) + dy * math.cos(tilt)) / squash
    theta = np.arctan2(across, along)
    r = np.hypot(across, along)
    # low harmonics make it lumpy, not an ellipse
    outline = np.ones_like(theta)
    for k in range(2, 7):
        outline += rng.normal(0, 0.22 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    inside = (radius * outline - r) / radius          # > 0 inside, in radius units
    fine = _granules(rng, h, w, rng.uniform(1.6, 2.8))
    coarse = _granules(rng, h, w, rng.uniform(2.5, 4.0))
    # the granular texture also decides the edge, which makes it ragged like the real ones
    edge = inside * rng.uniform(5, 10) + 0.6 * fine + 0.4 * coarse
    coverage = 1.0 / (1.0 + np.exp(np.clip(-2.5 * edge, -30.0, 30.0)))
    granules = np.clip(fine - rng.uniform(0.0, 0.8), 0.0, None)
    if style == "faint":
        fill, grain, ring = rng.uniform(0.15, 0.35), rng.uniform(0.15, 0.3), rng.uniform(0.25, 0.5)
        mottle = 0.3
    elif style == "saturated":
        fill, grain, ring, mottle = rng.uniform(1.05, 1.3), rng.uniform(0.0, 0.1), 0.0, 0.06
    else:
        fill, grain, ring = rng.uniform(0.3, 0.65), rng.uniform(0.2, 0.45), rng.uniform(0.0, 0.2)
        mottle = 0.25
    rim = np.exp(-((inside * radius / 4.0) ** 2))
    body = fill * (1.0 + mottle * coarse) + grain * granules + ring * rim
    return coverage * np.clip(body, 0.0, None), coverage


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dark grey base with uneven illumination and near-black gaps (grey levels 0..255)."""
    base = rng.uniform(30, 65)
    light = smooth_field(rng, h, w, int(rng.integers(3, 6)))
    patches = smooth_field(rng, h, w, int(rng.integers(4, 8)))
    return base + rng.uniform(10, 30) * light - rng.uniform(0, 35) * np.clip(patches, 0, None)


def _finish(rng: np.random.Generator, grey: np.ndarray, difficulty: Difficulty,
            extra_blur: float = 0.0) -> np.ndarray:
    """Contrast, defocus, resampling and sensor noise; ``uint8 (H, W, 3)`` with equal channels.

    The real crops are soft at the pixel scale (almost no power above 0.25 cycles/px, see
    ``benchmarks/real_stats.py``) with the blocky softness of a bilinear up-scale: the
    down-and-up resampling reproduces both. Their highlights clip at 255, which the final
    clip does to the bright rods and agglomerates drawn above 255.
    """
    mean = float(grey.mean())
    grey = mean + (grey - mean) * rng.uniform(*difficulty.contrast)
    noise_sigma = rng.uniform(*difficulty.noise)
    # noise before the blur becomes the fine grain of the real crops; a little stays sharp
    grey = grey + noise_sigma * rng.standard_normal(grey.shape, dtype=np.float32)
    blurred = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    blurred = blurred.filter(ImageFilter.GaussianBlur(rng.uniform(*difficulty.blur) + extra_blur))
    # the probe's crops are cut from frames at a lower resolution and scaled up
    h, w = grey.shape
    factor = rng.uniform(1.2, 1.9)
    small = blurred.resize((max(8, round(w / factor)), max(8, round(h / factor))),
                           Image.Resampling.BOX)
    grey = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    grey = grey + 0.3 * noise_sigma * rng.standard_normal(grey.shape, dtype=np.float32)
    channel = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(channel[:, :, None], 3, axis=2)


def render_cex(rng: np.random.Generator, difficulty: Difficulty) -> np.ndarray:
    """Draw one CEX crop: ``uint8 (151, 151, 3)``, grey, needles and rods on a dark background.

    Example:
        >>> img = render_cex(np.random.default_rng(0), DIFFICULTIES["realistic"])
        >>> img.shape, img.dtype.name
        ((151, 151, 3), 'uint8')
    """
    h = w = CEX_SIDE
    grey = _background(rng, h, w) + rng.uniform(0, 25)
    # a dense out-of-focus haze of broad needles fills most real CEX crops
    far = _needle_layer(rng, h, w, int(rng.integers(30, 70)), widths=(3, 10), lengths=(60, 260),
                        brightness=(0.3, 1.0))
    grey += rng.uniform(40, 90) * _blur(far, rng.uniform(2.5, 5.0))
    mid = _needle_layer(rng, h, w, int(rng.integers(6, 18)), widths=(2.5, 7), lengths=(40, 220),
                        brightness=(0.4, 1.0))
    grey += rng.uniform(40, 100) * _blur(mid, rng.uniform(1.5, 2.8))
    # gaps between the crystals stay near black in the real crops
    gaps = np.clip(smooth_field(rng, h, w, int(rng.integers(3, 6))), 0.0, 1.0)
    grey *= 1.0 - rng.uniform(0.3, 0.85) * gaps
    if rng.random() < 0.75:
        rods = _rod_layer(rng, h, w, int(rng.integers(1, 3)),
                          granular=rng.random() < difficulty.cex_granular_rod)
        # bright enough to clip, as the real rods do
        grey += rng.uniform(130, 240) * _blur(rods, rng.uniform(0.5, 1.5))
    if rng.random() < difficulty.cex_blob:
        centre = (rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w)
        bright, cover = _agglomerate(rng, h, w, centre=centre, radius=rng.uniform(15, 45),
                                     style="faint" if rng.random() < 0.5 else "granular")
        grey = grey * (1.0 - 0.5 * cover) + rng.uniform(120, 220) * bright
    near = _needle_layer(rng, h, w, int(rng.integers(0, 4)), widths=(2, 4.5), lengths=(30, 160),
                         brightness=(0.5, 1.0), bundle_share=0.8, supersample=2)
    grey += rng.uniform(40, 90) * _blur(near, rng.uniform(1.0, 1.8))
    return _finish(rng, grey, difficulty)


def pg_size(rng: np.random.Generator) -> tuple[int, int]:
    """``(height, width)`` of one PG crop: 130-230 px a side, usually a little taller than wide."""
    lo, hi = PG_SIDE_RANGE
    w = int(rng.integers(lo, hi + 1))
    h = int(np.clip(round(w * rng.uniform(0.9, 1.15)), lo, hi))
    if h == w == CEX_SIDE:
        w += 1  # 151 x 151 means CEX in the real data: keep that shortcut exact
    return h, w


def render_pg(rng: np.random.Generator, difficulty: Difficulty) -> np.ndarray:
    """Draw one PG crop: ``uint8 (H, W, 3)``, a granular agglomerate, 130-230 px a side.

    Example:
        >>> img = render_pg(np.random.default_rng(0), DIFFICULTIES["realistic"])
        >>> 130 <= img.shape[0] <= 230 and 130 <= img.shape[1] <= 230
        True
    """
    h, w = pg_size(rng)
    grey = _background(rng, h, w)
    # the suspension around a real PG crop always holds some far, soft needle haze
    haze = _needle_layer(rng, h, w, int(rng.integers(10, 40)), widths=(3, 10), lengths=(60, 260),
                         brightness=(0.3, 1.0))
    grey += rng.uniform(10, 45) * _blur(haze, rng.uniform(2.5, 5.0))
    if rng.random() < difficulty.pg_needles_behind:
        behind = _needle_layer(rng, h, w, int(rng.integers(4, 20)), widths=(1, 5),
                               lengths=(40, 260), brightness=(0.3, 1.0))
        grey += rng.uniform(25, 70) * _blur(behind, rng.uniform(1.2, 3.5))
    small = rng.random() < difficulty.pg_small
    faint = rng.random() < difficulty.pg_faint
    side = min(h, w)
    # real PG crops are cut tight around the agglomerate, which often touches the border
    radius = side * (rng.uniform(0.22, 0.32) if small else rng.uniform(0.36, 0.55))
    spread = 0.12 if small else 0.05
    centre = (h * (0.5 + rng.normal(0, spread)), w * (0.5 + rng.normal(0, spread)))
    if faint:
        # out of focus in a hazy suspension: lifted background, low contrast, soft
        grey += rng.uniform(25, 60)
        style = "faint"
    else:
        style = "saturated" if rng.random() < 0.15 else "granular"
    bright, cover = _agglomerate(rng, h, w, centre=centre, radius=radius, style=style)
    if style == "granular" and rng.random() < 0.35:
        # many agglomerates are fibrous inside: a felt of short bright fibres (real `PG (590)`)
        fibres = _needle_layer(rng, h, w, int(rng.integers(40, 120)), widths=(1, 2.5),
                               lengths=(8, 35), brightness=(0.4, 1.0), bundle_share=0.3)
        bright = bright + cover * rng.uniform(0.3, 0.7) * _blur(fibres, 0.7)
    # the agglomerate shades its surroundings: a dark halo as in the real crops
    halo = _blur(cover, radius / 3.0)
    grey = grey * (1.0 - rng.uniform(0.3, 0.7) * cover - rng.uniform(0.1, 0.5) * halo * (1 - cover))
    grey += rng.uniform(190, 260) * bright
    if rng.random() < difficulty.pg_needles_front:
        front = _needle_layer(rng, h, w, int(rng.integers(3, 12)), widths=(2, 9),
                              lengths=(60, 260), brightness=(0.4, 1.0), supersample=2)
        grey += rng.uniform(60, 150) * _blur(front, rng.uniform(0.8, 1.8))
        if rng.random() < 0.3:
            # sometimes a broad CEX rod lies across the agglomerate (real `PG (590)`)
            grey += rng.uniform(80, 160) * _rod_layer(rng, h, w, 1, granular=False)
    return _finish(rng, grey, difficulty, extra_blur=rng.uniform(0.2, 0.8) if faint else 0.0)


# ---- planning: which crystal gets which file numbers ----------------------------------------


def crystal_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The random generator of one crystal: depends only on (seed, class, crystal index).

    This is what makes the output independent of the number of worker processes.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, _CLASS_CODE[class_name], index]))


def plan_crystals(counts: dict[str, int], seed: int) -> list[CrystalTask]:
    """Crystals to draw, in file order: one task per CEX file, one per PG group of 3-5 views.

    The last PG group is truncated so the PG file count is exact.

    Example:
        >>> tasks = plan_crystals({"cex": 2, "pg": 7}, seed=0)
        >>> sum(t.n_views for t in tasks if t.class_name == "pg")
        7
    """
    tasks = [CrystalTask("cex", i, i + 1, 1) for i in range(counts["cex"])]
    group_rng = np.random.default_rng(np.random.SeedSequence([seed, _GROUP_PLAN_CODE, _CLASS_CODE["pg"]]))
    number, index = 1, 0
    while number <= counts["pg"]:
        size = min(int(group_rng.choice(PG_GROUP_SIZES)), counts["pg"] - number + 1)
        tasks.append(CrystalTask("pg", index, number, size))
        number += size
        index += 1
    return tasks


def file_relpath(class_name: str, number: int) -> str:
    """Path of a crop relative to OUT_DIR, Kaggle style: ``cropped/cropped/pg/PG (7).png``."""
    return f"{KAGGLE_SUBDIR.as_posix()}/{class_name}/{FILE_PREFIX[class_name]} ({number}).png"


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def render_crystal(task: CrystalTask, seed: int, difficulty: Difficulty) -> list[tuple[str, np.ndarray]]:
    """Draw one crystal and return its views as ``[(view_name, uint8 HxWx3), ...]``.

    A PG crystal's first view is the drawn image itself; the others are distinct dihedral
    transforms of it (pixel-exact, like the real augmentation groups).
    """
    rng = crystal_rng(seed, task.class_name, task.index)
    if task.class_name == "cex":
        return [("identity", render_cex(rng, difficulty))]
    others = [name for name in DIHEDRAL_VIEWS if name != "identity"]
    chosen = rng.choice(len(others), size=task.n_views - 1, replace=False)
    views = ["identity"] + [others[i] for i in sorted(chosen)]
    image = render_pg(rng, difficulty)
    return [(name, DIHEDRAL_VIEWS[name](image)) for name in views]


def _write_chunk(job: tuple[str, Sequence[CrystalTask], int, str]) -> list[tuple[str, str, str, str]]:
    """Worker: draw and write a chunk of crystals into the staging folder; return manifest rows."""
    root, tasks, seed, difficulty_name = job
    difficulty = DIFFICULTIES[difficulty_name]
    rows = []
    for task in tasks:
        crystal_id = f"{task.class_name}-{task.index + 1:05d}"
        for offset, (view, image) in enumerate(render_crystal(task, seed, difficulty)):
            rel = file_relpath(task.class_name, task.first_number + offset)
            Path(root, rel).write_bytes(_png_bytes(image))
            rows.append((rel, task.class_name, crystal_id, view))
    return rows


def _chunks(tasks: Sequence[CrystalTask], files_per_chunk: int) -> list[list[CrystalTask]]:
    chunks: list[list[CrystalTask]] = [[]]
    filled = 0
    for task in tasks:
        if filled >= files_per_chunk:
            chunks.append([])
            filled = 0
        chunks[-1].append(task)
        filled += task.n_views
    return [c for c in chunks if c]


# ---- the public entry point -----------------------------------------------------------------


def _check_options(out_dir: Path, per_class: int | None, seed: int, difficulty: str,
                   workers: int | None, force: bool) -> None:
    if per_class is not None and (isinstance(per_class, bool) or int(per_class) < 1):
        raise CrystalscopeError(f"--per-class {per_class} must be 1 or more")
    if int(seed) < 0:
        raise CrystalscopeError(f"--seed {seed} must be 0 or more")
    if difficulty not in DIFFICULTIES:
        raise CrystalscopeError(
            f"--difficulty {difficulty!r} is not known: use one of {', '.join(DIFFICULTIES)}")
    if workers is not None and int(workers) < 1:
        raise CrystalscopeError(f"--workers {workers} must be 1 or more")
    check_output(out_dir, kind="folder", force=force, command=COMMAND, option="OUT_DIR")


def _write_manifest(path: Path, rows: Sequence[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)


def generate(out_dir: str | os.PathLike, per_class: int | None = None, seed: int = 0,
             difficulty: str = "realistic", workers: int | None = None, force: bool = False,
             progress: bool = True) -> dict:
    """Write the synthetic CEX/PG stand-in in the Kaggle layout, atomically.

    Args:
        out_dir: folder to create; crops land in ``out_dir/cropped/cropped/{cex,pg}``.
        per_class: files per class; ``None`` = the real counts (6,860 CEX, 6,804 PG).
        seed: the same seed gives byte-identical files, whatever ``workers`` is.
        difficulty: ``easy``, ``realistic`` or ``hard`` (class overlap, blur, noise).
        workers: worker processes (default: CPU count).
        force: replace a non-empty ``out_dir`` (only once the new set is complete).
        progress: show a progress bar.

    Returns:
        Summary dict: ``out_dir``, ``counts``, ``crystals``, ``seed``, ``difficulty``,
        ``workers``, ``seconds``, ``manifest``.

    Example:
        >>> summary = generate("/tmp/synth-small", per_class=20, seed=1)  # doctest: +SKIP
        >>> summary["counts"]  # doctest: +SKIP
        {'cex': 20, 'pg': 20}
    """
    import time

    out_dir = Path(out_dir)
    _check_options(out_dir, per_class, seed, difficulty, workers, force)
    counts = dict(REAL_COUNTS) if per_class is None else {c: int(per_class) for c in REAL_COUNTS}
    tasks = plan_crystals(counts, int(seed))
    chunks = _chunks(tasks, files_per_chunk=48)
    # rendering is CPU-bound and scales with every core (no cap, unlike decoding)
    workers = min(default_workers(workers, cap=cpu_count()), len(chunks))
    started = time.perf_counter()
    with claim_output(out_dir, kind="folder", force=force, command=COMMAND, option="OUT_DIR"), \
            atomic_dir(out_dir, force=force, command=COMMAND) as staging:
        for class_name in REAL_COUNTS:
            (staging / KAGGLE_SUBDIR / class_name).mkdir(parents=True)
        jobs = [(str(staging), chunk, int(seed), difficulty) for chunk in chunks]
        sizes = [sum(task.n_views for task in chunk) for chunk in chunks]
        # in chunk order, so the manifest comes out in file order
        rows = [row for chunk_rows in run_chunks(_write_chunk, jobs, sizes, "synth", progress, workers)
                for row in chunk_rows]
        _write_manifest(staging / MANIFEST_NAME, rows)
    return {
        "out_dir": str(out_dir),
        "counts": counts,
        "crystals": {c: sum(1 for t in tasks if t.class_name == c) for c in REAL_COUNTS},
        "seed": int(seed),
        "difficulty": difficulty,
        "workers": workers,
        "seconds": round(time.perf_counter() - started, 2),
        "manifest": str(out_dir / MANIFEST_NAME),
    }
