"""Tiny generated class folders for tests: dark images with bright lines (CEX) or a bright disc (PG).

Class folders are named ``CEX`` and ``PG`` (upper case, as in the real dataset), so lower-cased
class names get checked too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COUNTS = {"train": (24, 24), "val": (10, 10), "test": (10, 6)}


def make_split(root: Path, counts=COUNTS, size: int = 36, seed: int = 0) -> Path:
    """Write ``root/<split>/{CEX,PG}/<CLS> (i).png`` with ``counts[split] = (n_cex, n_pg)``; returns ``root``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    for split, (n_cex, n_pg) in counts.items():
        for cls, n in (("CEX", n_cex), ("PG", n_pg)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
                if cls == "CEX":
                    img[rng.choice(size, 3, replace=False), :] = 200
                else:
                    cy, cx = rng.integers(12, size - 12, 2)
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 250
                Image.fromarray(img).save(folder / f"{cls} ({i + 1}).png")
    return root
