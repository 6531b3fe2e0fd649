"""The one map figure of ``embed`` and ``drift``: a 2-D scatter plus panels of thumbnails.

Built on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display), written
atomically. Points are coloured by one key (cluster, or image set) and shaped by another (true
class); some can be ringed (the images shown as thumbnails, or the flagged ones); the panels on
the right are pictures such as contact sheets
(:func:`crystalscope.evaluation.sheets.contact_sheet`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from crystalscope.errors import require
from crystalscope.figures import new_figure, save_png

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
_DPI = 90


def colour_of(index: int) -> tuple[int, int, int]:
    """The i-th colour of matplotlib's tab10 cycle as 0..255 RGB (shared by points and frames).

    Example:
        >>> colour_of(0)
        (31, 119, 180)
    """
    tab10 = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf")
    code = tab10[index % len(tab10)]
    return tuple(int(code[i:i + 2], 16) for i in (0, 2, 4))


@dataclass
class Panel:
    """A picture beside the map, with a title in the colour of the points it belongs to."""

    title: str
    image: Image.Image
    colour: tuple[int, int, int] = (0, 0, 0)


def _hex(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def _scatter(ax, coords: np.ndarray, colour_keys: Sequence[str], colours: dict[str, tuple],
             marker_keys: Sequence[str] | None, ring: np.ndarray | None, ring_label: str) -> None:
    size = float(np.clip(6000 / max(len(coords), 1), 8, 60))  # dense maps get smaller points
    colour_keys = np.asarray(colour_keys, dtype=object)
    marker_keys = np.asarray(marker_keys if marker_keys is not None else [""] * len(coords), dtype=object)
    markers = {key: MARKERS[i % len(MARKERS)] for i, key in enumerate(sorted(set(marker_keys)))}
    for colour_key, colour in colours.items():
        for marker_key, marker in markers.items():
            mask = (colour_keys == colour_key) & (marker_keys == marker_key)
            if mask.any():
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, marker=marker, c=_hex(colour),
                           alpha=0.75, linewidths=0)
    handles = [ax.scatter([], [], s=40, marker="o", c=_hex(c), label=str(k)) for k, c in colours.items()]
    if len(markers) > 1 or next(iter(markers)) != "":
        handles += [ax.scatter([], [], s=40, marker=m, c="#555555", label=f"true {k}") for k, m in markers.items()]
    if ring is not None and np.any(ring):
        ax.scatter(coords[ring, 0], coords[ring, 1], s=size * 3, facecolors="none", edgecolors="black",
                   linewidths=1.0)
        handles.append(ax.scatter([], [], s=60, facecolors="none", edgecolors="black", label=ring_label))
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.8)


def map_figure(coords: np.ndarray, colour_keys: Sequence[str], out_png: str | os.PathLike, *,
               colours: dict[str, tuple] | None = None, marker_keys: Sequence[str] | None = None,
               ring: np.ndarray | None = None, ring_label: str = "shown on the right",
               panels: Sequence[Panel] = (), xlabel: str = "", ylabel: str = "", title: str = "",
               height: float = 7.5) -> Path:
    """Draw the 2-D map (and picture panels to its right) and write it atomically as PNG.

    Args:
        coords: ``(N, 2)`` map positions.
        colour_keys: per point, the key that picks its colour (e.g. ``"cluster 2"``).
        colours: key -> RGB, in legend order (default: tab10 in sorted key order).
        marker_keys: per point, the key that picks its marker (e.g. the true class), or None.
        ring: boolean mask of points to circle in black (with ``ring_label`` in the legend).
        panels: pictures stacked to the right of the map.
        height: figure height in inches (taller for many panels or sheet rows).

    Example:
        >>> map_figure(np.random.rand(50, 2), ["a"] * 25 + ["b"] * 25, "map.png")  # doctest: +SKIP
        PosixPath('map.png')
    """
    require("matplotlib", "insight")
    coords = np.asarray(coords, dtype=float)
    if colours is None:
        colours = {key: colour_of(i) for i, key in enumerate(sorted(set(colour_keys), key=str))}
    figure = new_figure(13 if panels else 8, height, dpi=_DPI)
    grid = figure.add_gridspec(max(1, len(panels)), 2 if panels else 1, width_ratios=[3, 2] if panels else [1])
    ax = figure.add_subplot(grid[:, 0])
    _scatter(ax, coords, colour_keys, colours, marker_keys, ring, ring_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    for row, panel in enumerate(panels):
        pax = figure.add_subplot(grid[row, 1])
        pax.imshow(np.asarray(panel.image.convert("RGB")))
        pax.set_title(panel.title, fontsize=9, color=_hex(panel.colour), loc="left")
        pax.axis("off")
    return save_png(figure, out_png)
