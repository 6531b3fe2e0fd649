"""Rejection of foreign images, the numpy side: the fit, its scores, its storage.

Predictor, CSV, CLI and ONNX behaviour with a fitted rejection: tests/inference/test_ood_eval.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crystalscope.data.transforms import Preprocessing
from crystalscope.evaluation.ood import OODDetector, auroc, fit_detector, fpr_at_tpr, image_statistics

def gaussian_classes(rng, n: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes with correlated features (a shared covariance)."""
    mixing = np.random.default_rng(123).normal(size=(dim, dim))
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, dim)) @ mixing + 4.0 * labels[:, None]
    return features, labels


def test_threshold_gives_about_the_target_rate_on_held_out_data():
    rng = np.random.default_rng(0)
    train, train_y = gaussian_classes(rng, 2000)
    val, _ = gaussian_classes(rng, 2000)
    held_out, _ = gaussian_classes(rng, 20000)
    for target in (0.01, 0.05):
        det = fit_detector(train, train_y, val, np.zeros((len(val), 2)), 2, target, "mahalanobis")
        rate = float(np.mean(det.rejected(det.score(held_out, np.zeros((len(held_out), 2))))))
        assert target * 0.5 <= rate <= target * 1.6, (target, rate)
        assert det.val_rejection_rate <= target
    far = rng.normal(size=(200, 8)) * 30.0
    assert np.mean(det.rejected(det.score(far, np.zeros((200, 2))))) > 0.95


def test_fit_rejects_bad_options():
    from crystalscope.errors import CrystalscopeError

    rng = np.random.default_rng(1)
    x, y = gaussian_classes(rng, 40)
    with pytest.raises(CrystalscopeError, match="--reject-fpr"):
        fit_detector(x, y, x, np.zeros((40, 2)), 2, 1.5)
    with pytest.raises(CrystalscopeError, match="class #1"):
        fit_detector(x, np.zeros(40, int), x, np.zeros((40, 2)), 2, 0.01, "mahalanobis")
    with pytest.raises(CrystalscopeError, match="image statistics"):
        fit_detector(x, y, x, np.zeros((40, 2)), 2, 0.01)  # the default also scores the pixels


def test_auroc_and_fpr_match_sklearn_and_definition():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    ind, ood = rng.integers(0, 6, 300).astype(float), rng.integers(3, 10, 200).astype(float)
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[ind, ood])
    assert auroc(ind, ood) == pytest.approx(expected)
    # by the definition, not by the implementation's quantile: the largest threshold that still
    # rejects 95 % of the foreign scores, and the share of in-distribution scores it rejects
    threshold = max(t for t in np.unique(ood) if np.mean(ood >= t) >= 0.95)
    assert fpr_at_tpr(ind, ood) == pytest.approx(np.mean(ind >= threshold))
    assert 0.0 < fpr_at_tpr(ind, ood) < 1.0  # overlapping scores: neither trivial answer


def test_parameters_survive_checkpoint_and_compact_json(tmp_path):
    rng = np.random.default_rng(3)
    x, y = gaussian_classes(rng, 400, dim=16)
    stats = rng.normal(size=(400, 13))
    det = fit_detector(x, y, x, np.zeros((400, 2)), 2, 0.02, train_image_stats=stats, val_image_stats=stats)
    assert det.method == "mahalanobis+image_statistics"
    torch.save({"ood": det.to_dict()}, tmp_path / "c.pt")
    plain = OODDetector.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["ood"])
    compact = OODDetector.from_dict(json.loads(json.dumps(det.to_dict(compact=True))))
    probe, probe_stats = rng.normal(size=(50, 16)) * 3, rng.normal(size=(50, 13)) * 2
    reference = det.score(probe, np.zeros((50, 2)), probe_stats)
    assert np.array_equal(plain.score(probe, np.zeros((50, 2)), probe_stats), reference)
    assert np.allclose(compact.score(probe, np.zeros((50, 2)), probe_stats), reference, rtol=1e-4)
    assert len(json.dumps(det.to_dict(compact=True))) < 0.6 * len(json.dumps(det.to_dict()))


def test_texture_columns_tell_gravel_and_grass_from_crystal_crops():
    """The photos the first 26 statistics missed (grey gravel and grass) differ in texture."""
    from PIL import Image

    from crystalscope.data.ood_sets import photo_files
    from crystalscope.data.synth import DIFFICULTIES, render_cex, render_pg
    from crystalscope.evaluation.ood import IMAGE_STATISTICS

    textures = {f.stem: f for f in photo_files() if f.stem in ("gravel", "grass")}
    if len(textures) < 2:
        pytest.skip("scikit-image's gravel and grass photos are not installed (pip install .[ood])")
    pre, rng = Preprocessing(image_size=96), np.random.default_rng(4)
    crystals = np.stack([pre.resize_uint8(Image.fromarray(render(rng, DIFFICULTIES["realistic"])))
                         for render in (render_cex, render_pg) * 3])
    photos = np.stack([pre.resize_uint8(Image.open(f).convert("RGB").crop((0, 0, 180, 180)))
                       for f in textures.values()])
    column = {name: i for i, name in enumerate(IMAGE_STATISTICS)}
    crystal_stats, photo_stats = image_statistics(crystals), image_statistics(photos)
    # dense grains: many pixels are local minima (all 8 neighbours brighter)
    minima = column["brighter_neighbours_8"]
    assert photo_stats[:, minima].min() > crystal_stats[:, minima].max()
    # and the power spectrum falls off more slowly than on the smooth crystal crops
    slope = column["spectrum_slope"]
    assert photo_stats[:, slope].min() > crystal_stats[:, slope].max()


def test_a_model_fitted_on_the_first_26_statistics_still_scores():
    rng = np.random.default_rng(6)
    x, y = gaussian_classes(rng, 200)
    stats = image_statistics(rng.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8))
    assert stats.shape == (200, 42)
    old = fit_detector(x, y, x, np.zeros((200, 2)), 2, 0.05, train_image_stats=stats[:, :26],
                       val_image_stats=stats[:, :26])
    assert np.array_equal(old.score(x, np.zeros((200, 2)), stats), old.score(x, np.zeros((200, 2)), stats[:, :26]))


# ---- a tiny model with a fitted rejection ------------------------------------------------
