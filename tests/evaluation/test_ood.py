"""Rejection of foreign images: the fit, its storage, Predictor/CSV/CLI behaviour, ONNX parity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from crystalscope import Predictor  # noqa: E402
from crystalscope.cli import app  # noqa: E402
from crystalscope.data.ood_sets import FAR_SETS, NEAR_SETS, generate, set_folders  # noqa: E402
from crystalscope.data.transforms import Preprocessing  # noqa: E402
from crystalscope.evaluation.ood import OODDetector, auroc, fit_detector, fpr_at_tpr, image_statistics  # noqa: E402
from crystalscope.export.onnx import export_checkpoint  # noqa: E402
from crystalscope.inference.predictor import collect_images  # noqa: E402
from crystalscope.models.factory import HeadSpec, build_model  # noqa: E402
from crystalscope.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402

RUNNER = CliRunner()


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
    threshold = np.quantile(ood, 0.05, method="lower")
    assert np.mean(ood >= threshold) >= 0.95
    assert fpr_at_tpr(ind, ood) == pytest.approx(np.mean(ind >= threshold))


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


def tiny_checkpoint(fitted: bool) -> dict:
    """Untrained resnet18 at 48 px; rejection fitted on generated crystal crops."""
    from PIL import Image

    from crystalscope.data.synth import DIFFICULTIES, render_cex

    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    pre = Preprocessing(image_size=48)
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=pre, temperature=1.0)
    if fitted:
        rng = np.random.default_rng(0)
        resized = np.stack([pre.resize_uint8(Image.fromarray(render_cex(rng, DIFFICULTIES["realistic"])))
                            for _ in range(48)])
        logits, features = Predictor.from_checkpoint(ckpt).logits_and_features(pre.normalize(resized))
        stats = image_statistics(resized)
        det = fit_detector(features[:32], np.arange(32) % 2, features[32:], logits[32:], 2, 0.1,
                           train_image_stats=stats[:32], val_image_stats=stats[32:])
        ckpt["ood"] = det.to_dict()
    return ckpt


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ood-models")
    out = {}
    for name, fitted in (("fitted", True), ("old", False)):
        ckpt = save_checkpoint(tiny_checkpoint(fitted), root / f"{name}.ckpt")
        out[name] = ckpt
        out[f"{name}_onnx"] = Path(export_checkpoint(ckpt, root / f"{name}.onnx")["path"])
    return out


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory) -> Path:
    return Path(generate(tmp_path_factory.mktemp("ood") / "sets", per_set=3, seed=5)["out_dir"])


def test_generated_sets_are_png_folders_with_a_manifest(ood_dir):
    sets = set_folders(ood_dir)
    assert set(sets) == set(FAR_SETS + NEAR_SETS)
    for name, (folder, kind) in sets.items():
        files = sorted(folder.glob("*.png"))
        assert len(files) == 3 and kind == ("far" if name in FAR_SETS else "near")
    from PIL import Image

    text = np.asarray(Image.open(sets["text"][0] / "text_0001.png"))
    assert text.std() > 20  # real strokes, not a blank frame


def test_onnx_and_checkpoint_make_the_same_decisions(models, ood_dir, real_samples):
    files = collect_images([real_samples, ood_dir])
    by_ckpt = Predictor.load(models["fitted"], device="cpu").predict(files)
    by_onnx = Predictor.load(models["fitted_onnx"]).predict(files)
    assert [p.status for p in by_ckpt] == [p.status for p in by_onnx]
    assert {p.status for p in by_ckpt} == {"ok", "rejected"}  # the comparison is not vacuous
    scores = np.array([[a.ood_score, b.ood_score] for a, b in zip(by_ckpt, by_onnx)])
    assert np.allclose(scores[:, 0], scores[:, 1], rtol=1e-3)
    assert all(p.ood_threshold == by_ckpt[0].ood_threshold for p in by_onnx)


def test_csv_columns_rejected_rows_and_no_reject(models, ood_dir, tmp_path):
    def run(*extra):
        out = tmp_path / f"p{len(extra)}.csv"
        result = RUNNER.invoke(app, ["predict", str(models["fitted_onnx"]), str(ood_dir / "uniform"),
                                     str(ood_dir / "noise"), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        with open(out, newline="") as f:
            return list(csv.DictReader(f)), result.output

    rows, output = run()
    assert list(rows[0]) == ["path", "predicted", "confidence", "p_cex", "p_pg", "ood_score", "ood_threshold", "status"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and "rejected as foreign" in output
    for r in rejected:  # class probabilities are still written
        assert float(r["ood_score"]) > float(r["ood_threshold"])
        assert float(r["p_cex"]) + float(r["p_pg"]) == pytest.approx(1.0, abs=1e-5)
    plain, _ = run("--no-reject")
    assert all(r["status"] == "ok" and r["ood_score"] == "" for r in plain)
    assert [r["predicted"] for r in plain] == [r["predicted"] for r in rows]


def test_old_model_without_parameters_predicts_as_before(models, real_samples):
    for key in ("old", "old_onnx"):
        predictor = Predictor.load(models[key], device="cpu")
        assert predictor.rejection is None
        preds = predictor.predict(collect_images([real_samples]))
        assert all(p.status == "ok" and p.ood_score is None and p.predicted for p in preds)
    assert "ood" not in load_checkpoint(models["old"])


def test_ood_eval_reports_every_set(models, ood_dir, real_samples, tmp_path):
    result = RUNNER.invoke(app, ["ood-eval", str(models["fitted"]), str(real_samples), str(ood_dir),
                                 "--report", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "ood_eval.json").read_text())
    assert [s["name"] for s in report["sets"]] == list(FAR_SETS + NEAR_SETS)
    for s in report["sets"]:
        assert s["n_images"] == 3 and 0.0 <= s["auroc"] <= 1.0 and 0.0 <= s["rejection_rate"] <= 1.0
    assert "| uniform | far | 3 |" in (tmp_path / "rep" / "ood_eval.md").read_text()
    old = RUNNER.invoke(app, ["ood-eval", str(models["old"]), str(real_samples), str(ood_dir)])
    assert old.exit_code == 2 and "no fitted rejection" in old.output and "Traceback" not in old.output


def test_serve_rejects_the_foreign_image_like_predict(models, real_samples, tmp_path):
    """POST /api/predict on a model with rejection: the same statuses and scores as predict's CSV."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from crystalscope.inference.stream import predict_paths
    from crystalscope.serve.app import create_app

    files = sorted(real_samples.glob("*.png"))
    expected = {Path(p.path).name: p for p in predict_paths(models["fitted_onnx"], files, tmp_path / "p.csv",
                                                            progress=False).predictions}
    assert expected["not_a_crystal_cat.png"].status == "rejected"
    client = TestClient(create_app(Predictor.load(models["fitted_onnx"])))
    response = client.post("/api/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert response.status_code == 200, response.text
    results = {r["filename"]: r for r in response.json()["results"]}
    assert set(results) == set(expected)
    for name, row in results.items():
        assert row["status"] == expected[name].status
        assert row["ood_score"] == pytest.approx(expected[name].ood_score, abs=1e-6)
    info = client.get("/api/model").json()["rejection"]
    assert info["threshold"] == pytest.approx(expected["not_a_crystal_cat.png"].ood_threshold)
