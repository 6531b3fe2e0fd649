"""Contact sheets: real pixels, captions, frames by meaning, atomic PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from crystalscope.evaluation.sheets import COLOURS, Tile, contact_sheet


def test_sheet_grid_size_frames_and_file(tmp_path):
    grey = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (50, 1)))
    tiles = [Tile(grey, "cex 0.91\nok", "ok"), Tile(grey, "pg 0.55\nrejected", "rejected"),
             Tile(None, "broken.png\nerror", "error")]
    out = tmp_path / "sheet.png"
    sheet = contact_sheet(tiles, out, columns=2, cell=100, title="three images")
    assert out.is_file() and Image.open(out).size == sheet.size
    assert sheet.size[0] == 200 and sheet.size[1] > 200  # 2 columns x 2 rows plus captions
    pixels = np.asarray(sheet)
    assert pixels.std() > 10  # not a blank page
    # each frame is drawn in its meaning's colour
    colours = {tuple(int(v) for v in pixels[y, x]) for y in range(pixels.shape[0]) for x in (2, 102)}
    assert COLOURS["ok"] in colours and COLOURS["rejected"] in colours and COLOURS["error"] in colours
    assert not list(tmp_path.glob("*.tmp"))
