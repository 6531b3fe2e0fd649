"""How far are the real crops from the generated ones, in the eyes of an ImageNet network?

Issue 17's measurement, made with the functions of ``crystalscope drift``
(:mod:`crystalscope.insight.drift`, :mod:`crystalscope.insight.features`); this script only
generates the reference and picks the real CEX/PG crops:

- features: ImageNet ``efficientnet_lite0`` at 224 px, L2-normalised
  (:class:`~crystalscope.insight.features.ImageNetFeatures`, ``extract_features``);
- distance: mean cosine distance to the 10 nearest reference crops (``knn_distance``);
- reference: ``--fit`` generated crops (seed ``--seed``); threshold: the conformal
  ``(1 - --rate)`` quantile (``flag_threshold``) of held-out distances, which come either
  (``--held-out 0``, the default and what ``crystalscope drift`` does) from leaving each reference
  crop out together with the other views of its crystal (groups from the generator's
  ``synth_manifest.csv``), or (``--held-out N``, the script's older definition) from ``N`` other
  crops generated with seed ``--seed + 1``;
- a real crop is *flagged* when its distance exceeds the threshold;
- two-sample statistic: ``mmd_test`` (Gaussian-kernel MMD, permutation p-value) between the real
  crops and the held-out generated crops (one view per crystal with ``--held-out 0``). With 7
  real crops it has little power: a large p-value does not show the sets are alike.

It prints and writes JSON (``--json``): per real crop its distance and flag, the flagged
count, the threshold, the held-out distance quantiles and the MMD test.

    .venv/bin/python benchmarks/realism.py [--fit 2000] [--held-out 0] [--difficulty realistic] \
        [--json benchmarks/results/realism.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "real_samples"


def generated_paths(root: Path, count: int, seed: int, difficulty: str, workers: int) -> list[Path]:
    """Generate ``count`` crops (half per class) into ``root`` and list them."""
    from crystalscope.data.synth import generate

    generate(root, per_class=max(1, count // 2), seed=seed, difficulty=difficulty,
             workers=workers, force=True, progress=False)
    return sorted((root / "cropped" / "cropped").glob("*/*.png"))


def held_out(source, reference: np.ndarray, ref_paths: list[Path], args) -> tuple[np.ndarray, np.ndarray]:
    """Held-out generated distances and the generated rows the MMD compares the real crops with."""
    from crystalscope.insight.drift import held_out_distances, knn_distance, one_per_group, reference_groups
    from crystalscope.insight.embedding import read_groups

    if args.held_out > 0:  # other crops, another seed: no dihedral twin of them in the reference
        held = unit_features(source, generated_paths(args.work / "held", args.held_out, args.seed + 1,
                                                     args.difficulty, args.threads))
        return knn_distance(reference, held, args.k)[0], held
    manifest = reference_groups(ref_paths[0].parent)
    groups = read_groups(manifest, [str(p) for p in ref_paths]) if manifest else None
    distances = held_out_distances(reference, args.k, groups)[0]
    return distances, reference[one_per_group(groups, len(reference))]


def unit_features(source, paths: list[Path]) -> np.ndarray:
    """L2-normalised features of ``paths``, one row each (every file must be readable)."""
    from crystalscope.insight.features import extract_features, l2_normalise

    features = extract_features(source, paths)
    if features.errors:
        raise SystemExit(f"unreadable: {features.errors}")
    return l2_normalise(features.features)


def measure(args) -> dict:
    """The whole measurement; returns the JSON-able result."""
    from crystalscope.insight.drift import flag_threshold, knn_distance, mmd_test
    from crystalscope.insight.features import ImageNetFeatures

    real = sorted(p for p in args.real.glob("*.png") if p.name.startswith(("CEX", "PG")))
    if not real:
        raise SystemExit(f"no CEX/PG crops in {args.real}")
    source = ImageNetFeatures()
    ref_paths = generated_paths(args.work / "fit", args.fit, args.seed, args.difficulty, args.threads)
    reference = unit_features(source, ref_paths)
    held_d, held_rows = held_out(source, reference, ref_paths, args)
    threshold, note = flag_threshold(held_d, args.rate)
    real_x = unit_features(source, real)
    real_d = knn_distance(reference, real_x, args.k)[0]
    crops = {p.name: {"distance": round(float(d), 4), "flagged": bool(d > threshold)}
             for p, d in zip(real, real_d)}
    mmd = mmd_test(held_rows, real_x, args.permutations)
    return {
        "difficulty": args.difficulty, "seed": args.seed, "fit": len(reference),
        "held_out": len(held_d), "held_out_by": "seed+1" if args.held_out > 0 else "leave-one-crystal-out",
        "k": args.k, "rate": args.rate, "threshold": round(threshold, 4), "threshold_note": note,
        "held_out_quantiles": {q: round(float(np.quantile(held_d, float(q))), 4)
                               for q in ("0.5", "0.9", "0.99")},
        "flagged": sum(c["flagged"] for c in crops.values()), "real": len(crops), "crops": crops,
        "mmd_real_vs_held_out": {"mmd2": round(mmd["mmd2"], 5), "p_value": round(mmd["p_value"], 4),
                                 "permutations": mmd["permutations"], "bandwidth": round(mmd["bandwidth"], 4)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--fit", type=int, default=2000, help="generated reference crops")
    parser.add_argument("--held-out", type=int, default=0,
                        help="other generated crops for the threshold (0: leave one crystal out, as drift)")
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
    result = measure(args)
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
