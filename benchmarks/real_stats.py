"""Low-level image statistics of the real crops next to generated ones (issue 17, part 2).

Per image (grey levels 0-255): mean, spread and percentiles of the histogram, saturated and
near-black fractions, a robust noise level, the mean gradient (edge strength), the share of
power in four spatial-frequency bands, the lag-1 autocorrelation of the fine detail (how
smooth the pixel grain is), and how much darker or brighter the 8-px border is than the
centre. Prints one row per real crop and the mean per class of ``--count`` generated crops.

    .venv/bin/python benchmarks/real_stats.py [--count 60] [--difficulty realistic] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "real_samples"
BANDS = ((0.0, 0.03), (0.03, 0.1), (0.1, 0.25), (0.25, 0.71))   # cycles per pixel


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def band_power(grey: np.ndarray) -> list[float]:
    """Share of the (mean-removed, windowed) power spectrum in each of ``BANDS``."""
    h, w = grey.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((grey - grey.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.hypot(fy, fx)
    total = power.sum() + 1e-12
    return [float(power[(radius >= lo) & (radius < hi)].sum() / total) for lo, hi in BANDS]


def image_stats(grey: np.ndarray) -> dict:
    """The statistics of one grey image (see the module docstring)."""
    smooth = np.asarray(Image.fromarray(grey.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)),
                        dtype=np.float64)
    detail = grey - smooth
    # noise: median absolute deviation of the finest detail, scaled to a Gaussian sigma
    noise = float(1.4826 * np.median(np.abs(detail - np.median(detail))))
    gy, gx = np.gradient(grey)
    d = detail - detail.mean()
    lag1 = float((d[:, 1:] * d[:, :-1]).mean() / (d.var() + 1e-12))
    border = np.concatenate([grey[:8].ravel(), grey[-8:].ravel(), grey[:, :8].ravel(), grey[:, -8:].ravel()])
    centre = grey[grey.shape[0] // 4: -grey.shape[0] // 4, grey.shape[1] // 4: -grey.shape[1] // 4]
    p = np.percentile(grey, [1, 10, 50, 90, 99])
    return {
        "mean": grey.mean(), "std": grey.std(), "p1": p[0], "p10": p[1], "p50": p[2], "p90": p[3],
        "p99": p[4], "sat": float((grey >= 250).mean()), "dark": float((grey < 20).mean()),
        "noise": noise, "grad": float(np.hypot(gy, gx).mean()), "lag1": lag1,
        "border-centre": float(border.mean() - centre.mean()),
        **{f"band{i}": v for i, v in enumerate(band_power(grey))},
    }


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in row.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--count", type=int, default=60, help="generated crystals per class")
    parser.add_argument("--difficulty", default="realistic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from crystalscope.data.synth import DIFFICULTIES, crystal_rng, render_cex, render_pg

    result = {"real": {}, "generated": {}}
    for path in sorted(args.real.glob("*.png")):
        if path.name.startswith(("CEX", "PG")):
            result["real"][path.name] = image_stats(_grey(path))
            print(f"{path.name:16s}", _fmt(result["real"][path.name]))
    difficulty = DIFFICULTIES[args.difficulty]
    for name, render in (("cex", render_cex), ("pg", render_pg)):
        rows = [image_stats(render(crystal_rng(args.seed, name, i), difficulty)[:, :, 0].astype(np.float64))
                for i in range(args.count)]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        result["generated"][name] = mean
        print(f"generated {name:6s}", _fmt(mean))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
