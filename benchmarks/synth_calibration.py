"""Calibrate the synthetic set's difficulty with a frozen-feature linear probe.

DATASET.md: on the real crops, frozen ImageNet features (efficientnet_lite0) + logistic
regression trained on only 7 real crops get about 95 % of other real crops right. The
``realistic`` difficulty should put the same probe in the low-to-mid 90s.

For each difficulty this script generates ``--per-class`` crops per class, computes
efficientnet_lite0 ImageNet features once (stretch resize to ``--image-size``, the shared
preprocessing), and measures held-out accuracy of a logistic-regression head:

- ``probe``: 5-fold cross-validation grouped by crystal (all views of a PG crystal fall in
  the same fold, so dihedral copies cannot leak), trained on ~80 % of the crops;
- ``seven``: the real-data protocol: train on 3 CEX + 4 PG random crops (one view per PG
  crystal), test on all other crystals; mean over ``--draws`` draws.

When ../shared/real_samples is present it also trains on all synthetic crops of a difficulty
and predicts the 7 real crops, and trains on the 7 real crops and predicts the synthetic ones.

    .venv/bin/python benchmarks/synth_calibration.py [--per-class 300] [--image-size 160] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real_samples"
CLASSES = ("cex", "pg")


def features(paths: list[Path], image_size: int, batch: int = 32) -> np.ndarray:
    """Pooled efficientnet_lite0 ImageNet features, one row per image."""
    import torch

    from crystalscope.models.factory import create_backbone, default_preprocessing
    from crystalscope.models.weights import load_pretrained

    backbone = create_backbone("efficientnet_lite0")
    load_pretrained(backbone, "efficientnet_lite0", "imagenet")
    backbone.eval()
    pre = default_preprocessing("efficientnet_lite0", image_size=image_size, resize="stretch")
    rows = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            pixels = np.stack([pre.resize_uint8(p) for p in paths[i:i + batch]])
            rows.append(backbone(torch.from_numpy(pre.normalize(pixels))).numpy())
    return np.concatenate(rows)


def fit_head(train_x, train_y):
    """A standardised logistic-regression head on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(train_x, train_y)


def probe(train_x, train_y, test_x, test_y) -> float:
    """Held-out accuracy of the head."""
    return float((fit_head(train_x, train_y).predict(test_x) == test_y).mean())


def read_manifest(root: Path) -> list[dict]:
    with open(root / "synth_manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def grouped_cv(x, y, groups, folds: int = 5) -> float:
    from sklearn.model_selection import GroupKFold

    scores = [probe(x[tr], y[tr], x[te], y[te])
              for tr, te in GroupKFold(folds).split(x, y, groups)]
    return float(np.mean(scores))


def seven_crop(x, y, groups, first_view, draws: int, rng) -> float:
    """Train on 3 CEX + 4 PG crystals (one view each), test on all other crystals."""
    scores = []
    cex = np.flatnonzero((y == 0) & first_view)
    pg = np.flatnonzero((y == 1) & first_view)
    for _ in range(draws):
        train = np.concatenate([rng.choice(cex, 3, replace=False), rng.choice(pg, 4, replace=False)])
        test = ~np.isin(groups, groups[train])
        scores.append(probe(x[train], y[train], x[test], y[test]))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/synth/calibration"))
    parser.add_argument("--difficulties", default="easy,realistic,hard")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    from crystalscope.data.synth import generate

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    real_paths = sorted(p for p in REAL.glob("*.png") if p.name.startswith(("CEX", "PG"))) if REAL.is_dir() else []
    real_x = features(real_paths, args.image_size) if real_paths else None
    real_y = np.array([0 if p.name.startswith("CEX") else 1 for p in real_paths])
    results = {"per_class": args.per_class, "image_size": args.image_size, "seed": args.seed,
               "difficulties": {}}
    for difficulty in args.difficulties.split(","):
        root = args.work / difficulty
        generate(root, per_class=args.per_class, seed=args.seed, difficulty=difficulty,
                 workers=args.threads, force=True, progress=False)
        rows = read_manifest(root)
        x = features([root / r["path"] for r in rows], args.image_size)
        y = np.array([CLASSES.index(r["class"]) for r in rows])
        groups = np.array([r["crystal_id"] for r in rows])
        first_view = np.array([r["view"] == "identity" for r in rows])
        entry = {
            "probe_grouped_5fold": grouped_cv(x, y, groups),
            "seven_crop_mean": seven_crop(x, y, groups, first_view, args.draws,
                                          np.random.default_rng(args.seed)),
        }
        if real_x is not None:
            p_pg = fit_head(x, y).predict_proba(real_x)[:, 1]
            entry["train_synth_test_real"] = float(((p_pg > 0.5) == real_y).mean())
            entry["real_p_pg"] = {p.name: round(float(v), 3) for p, v in zip(real_paths, p_pg)}
            entry["train_real_test_synth"] = probe(real_x, real_y, x, y)
        results["difficulties"][difficulty] = entry
        print(difficulty, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in entry.items()}), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {results['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
