"""The distance and the two-sample test of benchmarks/realism.py, on small synthetic vectors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _realism():
    spec = importlib.util.spec_from_file_location("bench_realism", BENCH / "realism.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_knn_distance_is_zero_for_a_reference_row_and_one_for_an_orthogonal_one():
    realism = _realism()
    reference = np.eye(4)[:3]
    query = np.stack([reference[1], np.eye(4)[3]])
    distance = realism.knn_distance(reference, query, k=1)
    assert np.allclose(distance, [0.0, 1.0])
    # with k = 3 the first query also averages in its two orthogonal neighbours
    assert np.isclose(realism.knn_distance(reference, query[:1], k=3)[0], 2.0 / 3.0)


def test_mmd_separates_shifted_sets_and_not_identical_distributions():
    realism = _realism()
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(120, 16)))
    same = _unit(rng.normal(size=(20, 16)))
    shifted = _unit(rng.normal(size=(20, 16)) + 2.0)
    assert realism.mmd_test(same, reference, permutations=200)["p_value"] > 0.05
    far = realism.mmd_test(shifted, reference, permutations=200)
    assert far["p_value"] < 0.01 and far["mmd2"] > 0
