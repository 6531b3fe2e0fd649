"""Compare OOD scores for rejecting foreign images; prints the markdown table of docs/ood.md.

Candidates, each fitted on the training split and thresholded on the validation split at
``--fpr`` (the same rule as training's ``--reject-fpr``):

- ``maha-penult``: Mahalanobis distance (shared covariance, nearest class mean) on the
  penultimate features ``CrystalClassifier.embed`` (what crystalscope ships);
- ``energy`` and ``max-logit``: from the logits, no fitting;
- ``knn-penult``: distance to the k-th nearest training feature (L2-normalised features,
  Sun et al. 2022), which would need all training features stored with the model;
- ``maha-backbone``: Mahalanobis on the backbone's pooled features (1280-d for
  efficientnet_lite0: a 1.6M-float precision matrix);
- ``pixel-stats``: Mahalanobis on all 42 ``image_statistics`` of the resized images;
  ``pixel-stats-26`` on the first 26 only (brightness, histogram, gradients, block
  contrast: what crystalscope shipped before the texture columns), ``+neighbours`` and
  ``+spectrum`` add one texture group each to those 26;
- ``a + b``: the larger of two scores, each over its own val threshold (crystalscope ships
  ``maha-penult + pixel-stats``).

Each cell of the printed table: AUROC against the test crops / share rejected at the threshold.

Example:
    PYTHONPATH=src .venv/bin/python benchmarks/ood_compare.py /tmp/reject-demo/run/weights/best.ckpt \\
        /tmp/reject-demo/split /tmp/reject-ood --real ../shared/real_samples
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from crystalscope.data.dataset import decode_images, index_folder
from crystalscope.data.layout import list_images
from crystalscope.data.ood_sets import set_folders
from crystalscope.evaluation.ood import (IMAGE_STATISTICS, auroc, fit_mahalanobis, image_statistics,
                                        mahalanobis_score, threshold_for_fpr)
from crystalscope.models.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_from_checkpoint


def extract(model, preprocessing, paths, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Backbone pooled features, penultimate features, logits and image statistics of image files.

    With ``cache`` (an .npz path) the decoded images and features are kept there, so trying
    another score costs no forward passes.
    """
    if cache is not None and cache.is_file():
        stored = dict(np.load(cache))
    else:
        images = torch.from_numpy(decode_images(list(paths), preprocessing, progress=False))
        stored = {"backbone": [], "penult": [], "logits": []}
        with torch.inference_mode():
            for start in range(0, len(images), 64):
                x = preprocessing.normalize_torch(images[start:start + 64])
                pooled = model.backbone(x)
                penult = model.head[:-1](pooled)
                for key, value in (("backbone", pooled), ("penult", penult), ("logits", model.head[-1](penult))):
                    stored[key].append(value.numpy().astype(np.float64))
        stored = {k: np.concatenate(v) for k, v in stored.items()}
        stored["images"] = images.numpy()
        if cache is not None:
            np.savez(cache, **stored)
    # in chunks: the spectrum of a whole split at once would need gigabytes
    stored["pixels"] = np.concatenate([image_statistics(stored["images"][i:i + 256])
                                       for i in range(0, max(len(stored["images"]), 1), 256)])
    return stored


def knn_score(train: np.ndarray, feats: np.ndarray, k: int = 10) -> np.ndarray:
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    sims = unit(feats) @ unit(train).T
    return 1.0 - np.sort(sims, axis=1)[:, -k]


def column_groups() -> dict[str, np.ndarray]:
    """Column subsets of ``image_statistics``: before the texture columns, each texture group added, all."""
    names = np.array(IMAGE_STATISTICS)
    base = np.arange(26)
    neighbours = np.flatnonzero(np.char.startswith(names, "brighter_neighbours"))
    spectrum = np.flatnonzero(np.char.startswith(names, "spectrum"))
    return {"pixel-stats-26": base, "pixel-stats-26 +neighbours": np.concatenate([base, neighbours]),
            "pixel-stats-26 +spectrum": np.concatenate([base, spectrum]), "pixel-stats": np.arange(len(names))}


def scorers(train: dict, labels: np.ndarray, n_classes: int) -> dict:
    maha_p = fit_mahalanobis(train["penult"], labels, n_classes)
    maha_b = fit_mahalanobis(train["backbone"], labels, n_classes)
    pixel = {}
    for name, cols in column_groups().items():
        fitted = fit_mahalanobis(train["pixels"][:, cols], labels, n_classes)
        pixel[name] = (lambda d, cols=cols, fitted=fitted:
                       mahalanobis_score(d["pixels"][:, cols], fitted["means"], fitted["precision"]))
    return {
        **pixel,
        "maha-penult": lambda d: mahalanobis_score(d["penult"], maha_p["means"], maha_p["precision"]),
        "energy": lambda d: -np.log(np.exp(d["logits"]).sum(axis=1)),
        "max-logit": lambda d: -d["logits"].max(axis=1),
        "knn-penult": lambda d: knn_score(train["penult"], d["penult"]),
        "maha-backbone": lambda d: mahalanobis_score(d["backbone"], maha_b["means"], maha_b["precision"]),
    }


def combine(candidates: dict, val: dict, fpr: float) -> None:
    """Add max-of-normalised combinations: each score over its own val threshold."""
    for a, b in (("maha-penult", "pixel-stats-26"), ("maha-penult", "pixel-stats"),
                 ("maha-backbone", "pixel-stats")):
        ta, tb = threshold_for_fpr(candidates[a](val), fpr), threshold_for_fpr(candidates[b](val), fpr)
        candidates[f"{a} + {b}"] = (lambda d, a=a, b=b, ta=ta, tb=tb:
                                    np.maximum(candidates[a](d) / ta, candidates[b](d) / tb))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("split_dir")
    parser.add_argument("ood_dir")
    parser.add_argument("--real", default=None, help="folder of real crops (+ a not_a_crystal image)")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--cache", default=None, help="folder for decoded images and features (re-runs are fast)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    ckpt = load_checkpoint(args.checkpoint)
    model, pre = model_from_checkpoint(ckpt), preprocessing_from_checkpoint(ckpt)
    names = list(ckpt["class_names"])
    split = {s: index_folder(Path(args.split_dir) / s, class_names=names) for s in ("train", "val", "test")}
    cache = (lambda name: Path(args.cache) / f"{name}.npz") if args.cache else (lambda name: None)
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    data = {s: extract(model, pre, f.paths, cache(s)) for s, f in split.items()}
    ood = {name: extract(model, pre, list_images(folder), cache(name))
           for name, (folder, _) in set_folders(args.ood_dir).items()}
    real_files = list_images(args.real) if args.real else []
    real = extract(model, pre, real_files, cache("real")) if real_files else None
    candidates = scorers(data["train"], split["train"].labels, len(names))
    combine(candidates, data["val"], args.fpr)
    print("| score | val rej. | test rej. | " + " | ".join(ood) + " | cat rejected | real crystals rejected |")
    print("|---" * (5 + len(ood)) + "|")
    for cand, score in candidates.items():
        val, test = score(data["val"]), score(data["test"])
        threshold = threshold_for_fpr(val, args.fpr)
        cells = [f"{auroc(test, score(d)):.4f} / {np.mean(score(d) > threshold):.0%}" for d in ood.values()]
        real_cells = ["", ""]
        if real is not None:
            rejected = score(real) > threshold
            cat = [i for i, f in enumerate(real_files) if "crystal" in f.name.lower()]
            crystals = [i for i in range(len(real_files)) if i not in cat]
            real_cells = [str(bool(rejected[cat].all())) if cat else "",
                          f"{int(rejected[crystals].sum())} of {len(crystals)}"]
        print(f"| {cand} | {np.mean(val > threshold):.1%} | {np.mean(test > threshold):.1%} | " + " | ".join(cells)
              + f" | {real_cells[0]} | {real_cells[1]} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
