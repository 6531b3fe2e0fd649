"""Check ``crystalscope drift`` on sets whose answer is known, and print the table for docs/drift.md.

Writes probe folders next to each other under ``--work``:

- foreign (should be flagged): ``uniform`` frames, ``noise`` (Gaussian and salt-and-pepper),
  ``text`` (white lettering on a dark frame), ``photo`` (crops of the natural photos matplotlib
  ships in its sample data; scikit-image's too when it is installed);
- shifted crystal crops (should get a small p-value): ``blurred`` (Gaussian blur, radius 5 px) and
  ``darkened`` (pixel values times 0.4) copies of crops from ``--crops``;

then runs :func:`crystalscope.insight.drift.drift_report` of ``--reference`` against them, plus
any ``--extra`` folders (held-out generated crops, the real samples), and prints a Markdown table.

    PYTHONPATH=src .venv/bin/python benchmarks/drift_check.py --reference demo/split/train \\
        --crops demo/split/test --extra demo/split/val ../shared/real_samples --work /tmp/drift-check
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from crystalscope.data.images import load_rgb
from crystalscope.data.layout import list_images

FOREIGN = ("uniform", "noise", "text", "photo")
SHIFTED = ("blurred", "darkened")
SIDE = 151  # the real CEX crop side
BLUR_RADIUS = 5  # px on a ~150 px crop: heavily out of focus
DARKEN = 0.4  # pixel values times this: a dim lamp or a fouled window


def natural_photos() -> list[Image.Image]:
    """Photos shipped inside installed pip packages (no network): matplotlib's, scikit-image's if present."""
    import matplotlib.cbook as cbook

    photos = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        try:
            with cbook.get_sample_data(name, asfileobj=True) as handle, Image.open(handle) as photo:
                photo.load()  # decode before the file closes
                photos.append(load_rgb(photo).copy())
        except (OSError, ValueError):
            continue
    try:
        from skimage import data as skdata

        photos += [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea")]
    except Exception:  # scikit-image (or its data files) not installed: matplotlib's photos are enough
        pass
    return photos


def _foreign(kind: str, i: int, rng: np.random.Generator) -> Image.Image:
    if kind == "uniform":
        return Image.new("RGB", (SIDE, SIDE), (int(255 * ((i * 0.37) % 1.0)),) * 3)
    if kind == "noise":
        grey = rng.normal(128, 50, (SIDE, SIDE)) if i % 2 == 0 else rng.choice([0, 255], (SIDE, SIDE))
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    if kind == "text":
        frame = Image.new("RGB", (SIDE, SIDE), (20, 20, 20))
        draw = ImageDraw.Draw(frame)
        font = ImageFont.load_default(size=14 + 2 * (i % 5))
        for line in range(6):
            draw.text((6, 6 + line * 24), f"lot {i:03d} T={20 + line}C ok", fill=(230, 230, 230), font=font)
        return frame
    raise ValueError(kind)


def write_probe_sets(crops: Path, out: Path, per_set: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write the foreign and shifted probe folders under ``out``; returns ``{name: folder}``."""
    rng = np.random.default_rng(seed)
    folders = {name: out / name for name in FOREIGN + SHIFTED}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for kind in ("uniform", "noise", "text"):
        for i in range(per_set):
            _foreign(kind, i, rng).save(folders[kind] / f"{kind}_{i:03d}.png")
    photos = natural_photos()
    for i in range(per_set):
        photo = photos[i % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.3, 1.0))
        x, y = (int(rng.integers(0, photo.size[k] - side + 1)) for k in (0, 1))
        photo.crop((x, y, x + side, y + side)).resize((SIDE, SIDE)).save(folders["photo"] / f"photo_{i:03d}.png")
    crystals = list_images(crops)
    for i, path in enumerate(crystals[::max(1, len(crystals) // per_set)][:per_set]):  # spread over the classes
        crop = load_rgb(path)
        crop.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)).save(folders["blurred"] / f"blurred_{i:03d}.png")
        dark = (np.asarray(crop, dtype=np.float32) * DARKEN).astype(np.uint8)
        Image.fromarray(dark).save(folders["darkened"] / f"darkened_{i:03d}.png")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--crops", type=Path, required=True, help="crystal crops to blur and darken")
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more NEW folders to judge")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drift-check"))
    parser.add_argument("--per-set", type=int, default=50)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    from crystalscope.insight.drift import drift_report

    folders = write_probe_sets(args.crops, args.work / "probes", args.per_set)
    started = time.perf_counter()
    report = drift_report(args.reference, [*args.extra, *folders.values()], args.work / "report", model=args.model,
                          image_size=args.image_size)
    seconds = time.perf_counter() - started
    print(f"features: {report['features']}; reference {report['n_reference']} images; "
          f"threshold {report['threshold']:.4f}; {seconds:.0f} s")
    print("| set | images | flagged | 95 % interval | median distance | MMD² | p | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in report["sets"].items():
        low, high = s["flagged_ci95"]
        print(f"| {name} | {s['n_images']} | {s['n_flagged']} ({100 * s['flagged_fraction']:.1f} %) | "
              f"{100 * low:.1f}-{100 * high:.1f} % | {s['distance_quantiles']['p50']:.3f} | "
              f"{s['mmd']['mmd2']:.4f} | {s['mmd']['p_value']:.3g} | {s['verdict']} |")


if __name__ == "__main__":
    main()
