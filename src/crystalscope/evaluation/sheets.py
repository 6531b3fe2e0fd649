"""Contact sheets: a grid of images, each with a caption and a coloured frame.

One picture maker for every "show me the images" output (``predict --sheet``, the run folder's
``misclassified.png``, Grad-CAM overlays, the most foreign images of a drift report). It needs
Pillow only, so it works on a plant PC without matplotlib or torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from crystalscope.io import atomic_path

#: frame colours by meaning, shared by every sheet so a reader learns them once
COLOURS = {"ok": (46, 160, 67), "wrong": (214, 39, 40), "rejected": (255, 127, 14),
           "error": (128, 128, 128), "neutral": (90, 90, 90)}


@dataclass
class Tile:
    """One cell of a sheet.

    Attributes:
        image: the picture (any mode or size; it is converted and shrunk to fit).
        caption: up to a few short lines, drawn under the picture.
        kind: a key of :data:`COLOURS` (frame colour); ``rejected`` is also hatched.
        colour: an RGB frame colour that overrides the kind's (e.g. a cluster's colour on a map).
    """

    image: Image.Image | None
    caption: str = ""
    kind: str = "neutral"
    colour: tuple[int, int, int] | None = None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_tile(tile: Tile, cell: int, caption_px: int, font) -> Image.Image:
    canvas = Image.new("RGB", (cell, cell + caption_px), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    colour = tile.colour or COLOURS.get(tile.kind, COLOURS["neutral"])
    if tile.image is not None:
        picture = tile.image.convert("RGB")
        picture.thumbnail((cell - 8, cell - 8))
        canvas.paste(picture, ((cell - picture.width) // 2, (cell - picture.height) // 2))
    else:
        draw.line([(8, 8), (cell - 8, cell - 8)], fill=colour, width=2)
    if tile.kind == "rejected":  # hatched, so the flag survives a greyscale print
        for x in range(-cell, cell, 12):
            draw.line([(x, cell), (x + cell, 0)], fill=colour, width=1)
    draw.rectangle([1, 1, cell - 2, cell - 2], outline=colour, width=4)
    for i, line in enumerate(tile.caption.splitlines()[:3]):
        draw.text((4, cell + 2 + i * (caption_px // 3)), line, fill=(0, 0, 0), font=font)
    return canvas


def load_thumbnail(path: str | os.PathLike, side: int = 160) -> Image.Image | None:
    """The image at ``path`` as RGB shrunk to fit ``side`` px, or None when it cannot be read.

    A None tile is drawn as a crossed-out cell, so an unreadable file still has its place.

    Example:
        >>> load_thumbnail("no-such-file.png") is None
        True
    """
    from crystalscope.data.images import ImageReadError, load_rgb

    try:
        picture = load_rgb(path)
    except ImageReadError:
        return None
    picture.thumbnail((side, side))
    return picture


def contact_sheet(tiles: Sequence[Tile], out_png: str | os.PathLike | None = None, *,
                  columns: int = 8, cell: int = 160, title: str = "") -> Image.Image:
    """Lay ``tiles`` out in a grid; write it atomically to ``out_png`` when given.

    Example:
        >>> from PIL import Image
        >>> sheet = contact_sheet([Tile(Image.new("L", (50, 40), 128), "pg 0.97", "ok")] * 3, columns=2)
        >>> sheet.size
        (320, 416)
    """
    font = _font(max(10, cell // 12))
    caption_px = 3 * (max(10, cell // 12) + 3)
    title_px = caption_px // 2 if title else 0
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * cell, title_px + rows * (cell + caption_px)), (255, 255, 255))
    if title:
        ImageDraw.Draw(sheet).text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet.paste(_draw_tile(tile, cell, caption_px, font), (c * cell, title_px + r * (cell + caption_px)))
    if out_png is not None:
        with atomic_path(Path(out_png)) as tmp:
            sheet.save(tmp, format="PNG", optimize=True)
    return sheet


def _short(text: str, width: int = 22) -> str:
    """Fit a caption line in a cell: keep the end of a file name, where its number is."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def sheet_urgency(row) -> tuple:
    """Sort key of a prediction sheet: rejected and unreadable first, then the least confident."""
    flagged = row.status.startswith(("rejected", "error"))
    return (0 if flagged else 1, row.confidence if row.confidence is not None else -1.0)


def prediction_sheet(predictions: Sequence, out_png: str | os.PathLike, *, limit: int = 96,
                     title: str = "", n_total: int | None = None) -> Image.Image:
    """``predict --sheet``: each image with its predicted class, confidence and status.

    ``predictions`` are :class:`~crystalscope.inference.predictor.Prediction` rows (``path``,
    ``predicted``, ``confidence``, ``status``). A rejected row (``status`` starting with
    ``rejected``) gets an orange hatched frame, an unreadable file a grey crossed cell. When
    there are more than ``limit`` rows (or ``n_total`` says there were), the rejected and
    unreadable ones come first, then the least confident; the title says so.

    Example:
        >>> from types import SimpleNamespace as Row
        >>> rows = [Row(path="missing.png", predicted=None, confidence=None, status="error: file not found")]
        >>> prediction_sheet(rows, "sheet.png").size  # doctest: +SKIP
        (160, 208)
    """
    rows = list(predictions)
    shown, n_total = rows, max(n_total or 0, len(rows))
    if n_total > limit:  # n_total: rows a streaming caller has already narrowed down to ``limit``
        shown = sorted(rows, key=sheet_urgency)[:limit]
        title = (title + ": " if title else "") + f"{len(shown)} of {n_total} images, rejected and least confident first"
    tiles = []
    for row in shown:
        if row.status.startswith("error"):
            kind, middle = "error", "unreadable"
        else:
            kind = "rejected" if row.status.startswith("rejected") else "ok"
            middle = f"{row.predicted} {row.confidence:.3f}" if row.confidence is not None else str(row.predicted or "")
        picture = None if kind == "error" else load_thumbnail(row.path)
        tiles.append(Tile(picture, f"{_short(Path(row.path).name)}\n{middle}\n{_short(row.status)}", kind))
    return contact_sheet(tiles, out_png, title=title)


def misclassified_sheet(paths: Sequence[str], true_names: Sequence[str], predicted_names: Sequence[str],
                        confidences: Sequence[float], out_png: str | os.PathLike, *, limit: int = 64,
                        n_images: int | None = None) -> Image.Image:
    """The run folder's ``misclassified.png``: the images a model got wrong, most confident first.

    Example:
        >>> misclassified_sheet([], [], [], [], "misclassified.png", n_images=98).size  # doctest: +SKIP
        (160, 232)
    """
    order = sorted(range(len(paths)), key=lambda i: -float(confidences[i]))[:limit]
    tiles = [Tile(load_thumbnail(paths[i]), f"{_short(Path(paths[i]).name)}\ntrue {true_names[i]}\n"
                  f"pred {predicted_names[i]} {float(confidences[i]):.3f}", "wrong") for i in order]
    total = f" of {n_images}" if n_images is not None else ""
    if not tiles:
        title = f"0{total} misclassified"
    else:  # short: a sheet of two images is only 320 px wide
        title = f"{len(paths)}{total} misclassified" + (
            f", {limit} most confident shown" if len(paths) > limit else ", most confident first")
    return contact_sheet(tiles, out_png, columns=8, title=title)
