"""Matplotlib figures for every plot of the project: no pyplot (no global state, no display,
safe from threads such as the server's), and PNGs written atomically.

matplotlib is imported inside the functions: a plant PC that only runs ``predict`` imports this
module without it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from crystalscope.io import atomic_path

#: Dots per inch of the saved PNGs unless a plot asks for another.
DPI = 110


def new_figure(width: float, height: float, dpi: int = DPI):
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches on the Agg canvas.

    Example:
        >>> new_figure(2, 1, dpi=50).canvas.get_width_height()
        (100, 50)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, out_png: str | os.PathLike) -> Path:
    """Lay ``figure`` out and write it to ``out_png`` atomically (a reader never sees half a PNG).

    Example:
        >>> save_png(new_figure(2, 1), "/tmp/figure.png")  # doctest: +SKIP
        PosixPath('/tmp/figure.png')
    """
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        # the temporary name ends in .tmp, so the format is given explicitly
        figure.savefig(tmp, format="png", dpi=figure.dpi)
    figure.clear()
    return Path(out_png)


def png_bytes(figure) -> bytes:
    """``figure`` laid out and encoded as PNG bytes (for a caller that writes them itself)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    figure.clear()
    return buffer.getvalue()
