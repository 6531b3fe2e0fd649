"""Draw docs/img/synthetic_vs_real.png: real crops (top row) next to synthetic CEX and PG.

Every tile is shown at its native pixel size (the same scale for all), so size differences
between the classes are visible as they are in the data. The picture is stored at 64 grey
levels (to stay under 200 KB).

    .venv/bin/python benchmarks/sample_grid.py [--real ../shared/real_samples] [--out docs/img/synthetic_vs_real.png]

The real row is skipped when the real-samples folder is absent (a user's checkout).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from crystalscope.data.images import load_rgb
from crystalscope.data.layout import list_images
from crystalscope.data.synth import generate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "real_samples"
GAP, LABEL_H, PER_ROW = 6, 16, 7


def _first_views(root: Path, class_name: str, count: int) -> list[Path]:
    """The first ``count`` crops of a class, one per crystal (skip the extra PG views)."""
    import csv

    with open(root / "synth_manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["class"] == class_name]
    firsts = [r["path"] for r in rows if r["view"] == "identity"]
    return [root / p for p in firsts[:count]]


def _row(label: str, paths: list[Path], width: int) -> Image.Image:
    tiles = [load_rgb(p) for p in paths]
    height = LABEL_H + max(t.size[1] for t in tiles) + GAP
    row = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(row).text((2, 2), label, fill=(0, 0, 0))
    x = 0
    for tile in tiles:
        row.paste(tile, (x, LABEL_H))
        x += tile.size[0] + GAP
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="folder of real crops")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "synthetic_vs_real.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="realistic")
    args = parser.parse_args()

    width = PER_ROW * (215 + GAP)
    rows = []
    if args.real.is_dir():
        real = [p for p in list_images(args.real) if p.name.startswith(("CEX", "PG"))]
        rows.append(_row("real (OpenCrystalData, CC BY-SA 4.0): 3 CEX, 4 PG", real[:PER_ROW], width))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate(root, per_class=40, seed=args.seed, difficulty=args.difficulty, workers=1,
                 progress=False)
        rows.append(_row(f"synthetic CEX ({args.difficulty}, seed {args.seed})",
                         _first_views(root, "cex", PER_ROW), width))
        rows.append(_row(f"synthetic PG ({args.difficulty}, seed {args.seed}), first view of each crystal",
                         _first_views(root, "pg", PER_ROW), width))
    grid = Image.new("L", (width, sum(r.size[1] for r in rows)), 255)
    y = 0
    for row in rows:
        grid.paste(row.convert("L"), (0, y))
        y += row.size[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 64 grey levels keep the picture under the 200 KB a README image may take; the crops'
    # soft, noisy texture does not compress well at 256 levels
    grid = grid.point(lambda v: min(255, v // 4 * 4 + 2))
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
