"""The audit's two pictures: image size per class and the grey-level histogram per class."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from crystalscope.data.audit.fingerprint import HISTOGRAM_BINS, ImageRecord
from crystalscope.errors import require
from crystalscope.figures import new_figure, save_png


def plot_sizes(records: Sequence[ImageRecord], classes: Sequence[str], out_png: Path) -> None:
    """Width x height per class; marker area grows with the number of images of that size."""
    require("matplotlib", "train")
    fig = new_figure(6, 5)
    ax = fig.add_subplot(1, 1, 1)
    per_class = {name: Counter((r.width, r.height) for r, c in zip(records, classes)
                               if c == name and r.readable) for name in sorted(set(classes))}
    largest = max((n for sizes in per_class.values() for n in sizes.values()), default=1)
    colour = {name: f"C{i}" for i, name in enumerate(per_class)}  # same colours as plot_intensity
    # classes with few distinct sizes (e.g. every CEX crop 151 x 151) are drawn last, on top
    for class_name, sizes in sorted(per_class.items(), key=lambda kv: -len(kv[1])):
        if not sizes:
            continue
        xy = np.array(list(sizes))
        counts = np.array(list(sizes.values()), dtype=float)
        ax.scatter(xy[:, 0], xy[:, 1], s=10 + 250 * np.sqrt(counts / largest), alpha=0.5,
                   color=colour[class_name],
                   label=f"{class_name}: {int(counts.sum())} images, {len(sizes)} distinct sizes")
        (w, h), n = sizes.most_common(1)[0]
        if n / counts.sum() >= 0.2:
            ax.annotate(f"{w}x{h}: {n}", (w, h), textcoords="offset points", xytext=(8, -12), fontsize=8)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image size per class")
    ax.legend(loc="best", fontsize=8)
    save_png(fig, out_png)


def plot_intensity(records: Sequence[ImageRecord], classes: Sequence[str], out_png: Path) -> None:
    """Grey-level distribution per class (all pixels of the class pooled, normalised)."""
    require("matplotlib", "train")
    fig = new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) * 256 / HISTOGRAM_BINS
    for i, class_name in enumerate(sorted(set(classes))):
        hists = [r.histogram for r, c in zip(records, classes) if c == class_name and r.readable]
        if not hists:
            continue
        pooled = np.sum(hists, axis=0).astype(float)
        ax.plot(centres, pooled / pooled.sum(), label=class_name, color=f"C{i}")
    ax.set_xlabel("grey level (luma)")
    ax.set_ylabel("fraction of pixels")
    ax.set_yscale("log")
    ax.set_title("Intensity histogram per class")
    ax.legend()
    save_png(fig, out_png)
