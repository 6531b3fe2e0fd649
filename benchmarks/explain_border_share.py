"""How much of a model's Grad-CAM heat sits along the edges of the pictures, per image group.

For each image the heat map (mapped back onto the original image by
:func:`crystalscope.insight.explain.explain_batch`) is summed over the outer band of
``--band`` (default 10 %) of the width and height; that band is 36 % of the area, so a map that
ignores position would put about 0.36 of its heat there. A much larger share means the
evidence for the class sits at the picture's border (the frame, the crop edge, the letterbox
bars next to it) rather than on the crystal. Prints a Markdown table (median and quartiles).

Example:
    PYTHONPATH=src .venv/bin/python benchmarks/explain_border_share.py demo/run/weights/best.ckpt \\
        "generated cex=demo/split/test/cex" "real pg=../shared/real_samples/PG*" \\
        --layer backbone.bn2 --layer backbone.blocks.4
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys

import numpy as np
import torch

from crystalscope import Predictor
from crystalscope.inference.predictor import collect_images
from crystalscope.insight.explain import explain_batch


def border_share(heatmap: np.ndarray, band: float) -> float:
    """Fraction of the map's total heat within ``band`` of any edge (nan for an empty map)."""
    height, width = heatmap.shape
    by, bx = round(band * height), round(band * width)
    total = float(heatmap.sum())
    return float("nan") if total <= 0 else 1.0 - float(heatmap[by:height - by, bx:width - bx].sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("groups", nargs="+", help="NAME=PATH: a folder, an image or a glob pattern (quoted)")
    parser.add_argument("--layer", action="append", help="module name(s) [default: the default layer]")
    parser.add_argument("--band", type=float, default=0.10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor.load(args.checkpoint, device="cpu")
    print(f"`{' '.join(shlex.quote(a) for a in [sys.argv[0].split('/')[-1], *sys.argv[1:]])}`\n")
    print("| layer | images | n | heat in the outer band: median (quartiles) | mean confidence |")
    print("|---|---|---|---|---|")
    for layer in args.layer or [None]:
        for group in args.groups:
            name, _, path = group.partition("=")
            files = collect_images(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
            results = [r for i in range(0, len(files), 16)
                       for r in explain_batch(predictor, files[i:i + 16], layer=layer)]
            shares = np.array([border_share(r.heatmap, args.band) for r in results if r.ok])
            q1, median, q3 = np.nanpercentile(shares, [25, 50, 75])
            confidence = np.mean([r.confidence for r in results if r.ok])
            print(f"| {layer or 'default'} | {name} | {len(shares)} | {median:.2f} ({q1:.2f}-{q3:.2f}) | {confidence:.3f} |")


if __name__ == "__main__":
    main()
