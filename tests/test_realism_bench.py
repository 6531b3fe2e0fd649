"""benchmarks/realism.py's own part: the generated reference and its crystal groups.

The distance, threshold and MMD are the library's (tested in tests/insight/test_drift.py); here we
check that the script holds views of one crystal out together and tests one view per crystal.
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_scripts import load_bench


def test_leave_one_crystal_out_uses_the_generators_groups(tmp_path):
    from crystalscope.insight.drift import held_out_distances
    from crystalscope.insight.embedding import read_groups

    realism = load_bench("realism")
    paths = realism.generated_paths(tmp_path, count=24, seed=0, difficulty="realistic", workers=1)
    groups = read_groups(tmp_path / "synth_manifest.csv", [str(p) for p in paths])
    assert len(set(groups)) < len(paths), "the generator should emit several views of some crystals"
    # features that make views of one crystal identical: with groups ignored they are each other's neighbours
    codes = {g: i for i, g in enumerate(sorted(set(groups)))}
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(len(codes), 16))[[codes[g] for g in groups]]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    args = argparse.Namespace(held_out=0, k=3)
    distances, rows = realism.held_out(None, reference, paths, args)
    assert len(rows) == len(set(groups))
    assert np.allclose(distances, held_out_distances(reference, 3, groups)[0])
    assert distances.min() > held_out_distances(reference, 3)[0].min() + 0.1
