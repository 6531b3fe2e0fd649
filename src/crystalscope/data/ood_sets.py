"""Foreign-image test sets for measuring rejection, generated offline as PNG folders.

Far out-of-distribution (what a plant camera shows when something is wrong, and things that
are plainly not crystals): ``photos`` (random crops of the natural photos that scikit-image
ships inside its wheel, or matplotlib's sample photos when scikit-image is not installed; no
network), ``uniform`` and ``gradient`` frames, ``noise``, ``overexposed`` and ``underexposed``
crystal frames, ``text`` and ``checkerboard``. Near out-of-distribution (hard on purpose):
``blurred`` (heavily defocused crystal crops) and ``cropped`` (a small window of a crop, the
crystal cut off). Crystal crops come from the synthetic generator
(:func:`crystalscope.data.synth.render_cex` / ``render_pg``) or from a folder of real crops.

Layout: ``OUT/<set>/<set>_0001.png`` plus ``OUT/ood_sets.json`` (set -> far/near), which
:func:`set_folders` reads back.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from crystalscope.data.images import load_rgb
from crystalscope.data.layout import list_images
from crystalscope.errors import CrystalscopeError
from crystalscope.safety import check_output, report_folder

FAR_SETS = ("photos", "uniform", "gradient", "noise", "overexposed", "underexposed", "text", "checkerboard")
NEAR_SETS = ("blurred", "cropped")
MANIFEST_NAME = "ood_sets.json"
COMMAND = "synth-ood"  # named in the output's manifest: --force replaces only what a synth-ood wrote
# scikit-image's bundled natural photos (shipped in the wheel; no download needed)
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                  "retina.jpg", "rocket.jpg")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
WORDS = ("crystal", "batch", "reactor", "sample", "probe", "filter", "lot", "error", "camera", "seed", "cooling",
         "PG", "CEX", "2026-11-29", "12:04:55", "OK", "T=23.4C", "stirrer", "window", "frame")


def photo_files() -> list[Path]:
    """The bundled natural photos found in installed packages (scikit-image, else matplotlib)."""
    found: list[Path] = []
    for package, names, sub in (("skimage", SKIMAGE_PHOTOS, ("data",)),
                                ("matplotlib", MATPLOTLIB_PHOTOS, ("mpl-data", "sample_data"))):
        spec = importlib.util.find_spec(package)  # locate without importing (skimage is slow to import)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*sub)
        found = [folder / n for n in names if (folder / n).is_file()]
        if found:
            return found
    return found


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) in the range of the real crops (~150-230 px)."""
    return int(rng.integers(140, 231)), int(rng.integers(140, 231))


def _photo(rng, photos: list[np.ndarray]) -> np.ndarray:
    source = photos[int(rng.integers(len(photos)))]
    h, w = source.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(source[top:top + side, left:left + side])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize(_size(rng), Image.Resampling.BILINEAR))


def _uniform(rng) -> np.ndarray:
    w, h = _size(rng)
    colour = rng.integers(0, 256, 3) if rng.random() < 0.5 else np.repeat(rng.integers(0, 256), 3)
    return np.broadcast_to(colour.astype(np.uint8), (h, w, 3)).copy()


def _gradient(rng) -> np.ndarray:
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return (start + ramp[..., None] * (end - start)).clip(0, 255).astype(np.uint8)


def _noise(rng) -> np.ndarray:
    w, h = _size(rng)
    kind = rng.integers(3)
    if kind == 0:  # Gaussian sensor noise around a grey level
        frame = rng.normal(rng.uniform(30, 220), rng.uniform(10, 80), (h, w, 1))
    elif kind == 1:  # colour uniform noise
        frame = rng.uniform(0, 255, (h, w, 3))
    else:  # salt and pepper on black
        frame = 255.0 * (rng.random((h, w, 1)) < rng.uniform(0.02, 0.3))
    return np.broadcast_to(frame.clip(0, 255), (h, w, 3)).astype(np.uint8)


def _text(rng) -> np.ndarray:
    w, h = _size(rng)
    ink, paper = (0, 255) if rng.random() < 0.5 else (255, 0)
    image = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(14, 34)))
    y = int(rng.integers(0, 12))
    while y < h:
        line = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 4))
        draw.text((int(rng.integers(-20, 10)), y), line, fill=ink, font=font)
        y += int(font.size * rng.uniform(1.1, 1.6))
    return np.asarray(image.convert("RGB"))


def _checkerboard(rng) -> np.ndarray:
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w]
    period, angle = rng.uniform(6, 40), rng.uniform(0, np.pi / 2)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    cells = (np.floor(u / period) + np.floor(v / period)) % 2
    dark, light = rng.integers(0, 100, 3), rng.integers(155, 256, 3)
    return np.where(cells[..., None] > 0, light, dark).astype(np.uint8)


def _overexposed(rng, crystal: np.ndarray) -> np.ndarray:
    return (crystal.astype(np.float64) * rng.uniform(2, 4) + rng.uniform(90, 150)).clip(0, 255).astype(np.uint8)


def _underexposed(rng, crystal: np.ndarray) -> np.ndarray:
    return (crystal.astype(np.float64) * rng.uniform(0.02, 0.08)).clip(0, 255).astype(np.uint8)


def _blurred(rng, crystal: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(crystal).filter(ImageFilter.GaussianBlur(rng.uniform(6, 12))))


def _cropped(rng, crystal: np.ndarray) -> np.ndarray:
    """A window of 25-40 % of the side, from near an edge: most of the crystal is cut off."""
    h, w = crystal.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(0.25, 0.4)))
    top = int(rng.choice([0, h - side])) if rng.random() < 0.5 else int(rng.integers(0, h - side + 1))
    left = int(rng.choice([0, w - side])) if top not in (0, h - side) else int(rng.integers(0, w - side + 1))
    return crystal[top:top + side, left:left + side].copy()


# ---- assembling the sets ------------------------------------------------------------------


def _crystal_source(crystal_dir: str | os.PathLike | None, seed: int) -> Callable[[np.random.Generator], np.ndarray]:
    """rng -> one uint8 RGB crystal crop: generated, or drawn from the images in ``crystal_dir``."""
    if crystal_dir is None:
        from crystalscope.data.synth import DIFFICULTIES, render_cex, render_pg

        def generated(rng):
            render = render_cex if rng.random() < 0.5 else render_pg
            return render(rng, DIFFICULTIES["realistic"])

        return generated
    files = list_images(crystal_dir)
    if not files:
        raise CrystalscopeError(f"--crystals {crystal_dir}: no images found there")
    return lambda rng: np.asarray(load_rgb(files[int(rng.integers(len(files)))]))


def _renderers(crystal: Callable, photos: list[np.ndarray]) -> dict[str, Callable]:
    return {
        "photos": lambda rng: _photo(rng, photos), "uniform": _uniform, "gradient": _gradient, "noise": _noise,
        "overexposed": lambda rng: _overexposed(rng, crystal(rng)),
        "underexposed": lambda rng: _underexposed(rng, crystal(rng)),
        "text": _text, "checkerboard": _checkerboard,
        "blurred": lambda rng: _blurred(rng, crystal(rng)), "cropped": lambda rng: _cropped(rng, crystal(rng)),
    }


def generate(out_dir: str | os.PathLike, per_set: int = 100, seed: int = 0, sets: tuple[str, ...] | None = None,
             crystal_dir: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Write the foreign-image sets as PNG folders under ``out_dir`` (atomically).

    Args:
        out_dir: folder to create (must be new or empty unless ``force``).
        per_set: images per set.
        seed: the same seed gives the same images.
        sets: which sets (default all of :data:`FAR_SETS` and :data:`NEAR_SETS`).
        crystal_dir: real or generated crops for the crystal-based sets (default: generated).
        force: replace an existing ``out_dir`` once the new one is complete.

    Returns:
        ``{"out_dir", "sets": {name: {"kind", "count", "folder"}}, "photo_source"}``.

    Example:
        >>> generate("/tmp/ood", per_set=20)["sets"]["text"]["kind"]  # doctest: +SKIP
        'far'
    """
    sets = tuple(sets or FAR_SETS + NEAR_SETS)
    unknown = [s for s in sets if s not in FAR_SETS + NEAR_SETS]
    if unknown:
        raise CrystalscopeError(f"--sets {','.join(unknown)}: unknown; choose from {', '.join(FAR_SETS + NEAR_SETS)}")
    if per_set < 1:
        raise CrystalscopeError(f"--per-set {per_set} must be 1 or more")
    # the one output rule: a new folder, or an earlier synth-ood output replaced with --force
    # (a folder holding anything else is refused, never deleted)
    out_dir = check_output(out_dir, inputs=[crystal_dir], kind="folder", force=force, command=COMMAND, option="OUT_DIR")
    files = photo_files()
    if "photos" in sets and not files:
        raise CrystalscopeError("no bundled photos found: install scikit-image (pip install scikit-image) "
                                "or matplotlib, or leave 'photos' out of --sets")
    photos = [np.asarray(load_rgb(f)) for f in files] if "photos" in sets else []
    renderers = _renderers(_crystal_source(crystal_dir, seed), photos)
    summary = {}
    # claimed again at writing: one writer at a time (the lock), a killed run's staging cleaned
    with report_folder(out_dir, inputs=[crystal_dir], command=COMMAND, force=force, option="OUT_DIR") as staging:
        for index, name in enumerate(sets):
            rng = np.random.default_rng([int(seed), index, 1729])
            (staging / name).mkdir()
            for i in range(per_set):
                Image.fromarray(renderers[name](rng)).save(staging / name / f"{name}_{i + 1:04d}.png")
            summary[name] = {"kind": "far" if name in FAR_SETS else "near", "count": per_set,
                             "folder": str(out_dir / name)}
        manifest = {name: info["kind"] for name, info in summary.items()}
        (staging / MANIFEST_NAME).write_text(json.dumps({"sets": manifest, "seed": int(seed)}, indent=2) + "\n")
    source = None if not files else "scikit-image" if "skimage" in files[0].parts else "matplotlib"
    return {"out_dir": str(out_dir), "sets": summary, "photo_source": source}


def set_folders(folder: str | os.PathLike) -> dict[str, tuple[Path, str]] | None:
    """``{set: (folder, kind)}`` when ``folder`` was written by :func:`generate`, else None."""
    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        sets = json.loads(manifest.read_text())["sets"]
    except (ValueError, KeyError, TypeError):
        raise CrystalscopeError(f"{manifest}: not a readable OOD-set manifest; regenerate with synth-ood") from None
    return {name: (Path(folder) / name, str(kind)) for name, kind in sets.items() if (Path(folder) / name).is_dir()}
