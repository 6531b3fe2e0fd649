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
    """

    image: Image.Image | None
    caption: str = ""
    kind: str = "neutral"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_tile(tile: Tile, cell: int, caption_px: int, font) -> Image.Image:
    canvas = Image.new("RGB", (cell, cell + caption_px), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    colour = COLOURS.get(tile.kind, COLOURS["neutral"])
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
