"""Rejection of foreign images through the Predictor: ckpt/ONNX parity, CSV, CLI, ood-eval, serve."""

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
from crystalscope.evaluation.ood import fit_detector, image_statistics  # noqa: E402
from crystalscope.export.onnx import export_checkpoint  # noqa: E402
from crystalscope.inference.ood_eval import evaluate_ood  # noqa: E402
from crystalscope.inference.predictor import collect_images  # noqa: E402
from crystalscope.models.factory import HeadSpec, build_model  # noqa: E402
from crystalscope.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402

RUNNER = CliRunner()


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


def test_evaluate_ood_rates_are_those_of_predict(models, ood_dir, real_samples, tmp_path, monkeypatch):
    """The library call behind ood-eval: its rejection rates are what Predictor.predict decides."""
    monkeypatch.chdir(tmp_path)  # where a report without a folder would land
    result = evaluate_ood(models["fitted_onnx"], real_samples, [ood_dir / "uniform"], batch_size=3)
    predicted = Predictor.load(models["fitted_onnx"]).predict(collect_images([real_samples]))
    rate = sum(p.rejected for p in predicted) / sum(p.classified for p in predicted)
    assert result.in_distribution.rejection_rate == pytest.approx(rate)
    assert result.in_distribution.n_images == 8 and result.backend == "onnx"
    uniform = Predictor.load(models["fitted_onnx"]).predict(collect_images([ood_dir / "uniform"]))
    assert result.sets[0].rejection_rate == pytest.approx(sum(p.rejected for p in uniform) / 3)
    assert list(tmp_path.iterdir()) == []  # no report folder given: nothing written
