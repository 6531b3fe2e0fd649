"""evaluate: the test report of a saved model on a folder, through the Predictor forward of predict.

The tests against a trained model use the ``train`` command on tiny generated lines-and-discs
splits (``tests/lines_and_discs.py``); the Predictor-path tests use the real sample crops, laid
out as class folders in a temporary folder.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from close_rows import assert_rows_close

from crystalscope.cli import app
from crystalscope.data.dataset import index_folder
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.calibration import softmax
from crystalscope.inference.evaluate import data_hash, evaluate_checkpoint, folder_logits, training_data_warning
from crystalscope.inference.predictor import Predictor
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
from crystalscope.models.factory import HeadSpec, build_model
from lines_and_discs import make_split

RUNNER = CliRunner()
TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("data") / "split")


@pytest.fixture(scope="module")
def e2e_run(split, tmp_path_factory) -> Path:
    """A trained resnet18 (no pretrained weights, 64 px, 2 epochs), with its test report."""
    out = tmp_path_factory.mktemp("runs") / "RUN"
    result = RUNNER.invoke(app, ["train", str(split), "--backbone", "resnet18", "--weights", "none", "--image-size",
                                 "64", "--epochs", "2", "--f1-threshold", "1.1", "--out", str(out), "--cache-dir",
                                 str(tmp_path_factory.mktemp("cache")), "--no-onnx"])
    assert result.exit_code == 0, result.output
    return out


def tiny_checkpoint(ood: dict | None = None, training: dict | None = None) -> dict:
    """Untrained resnet18 whose logits are spread over a few units (so comparisons bite)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=TEMPERATURE, training=training,
                           preprocessing=Preprocessing(image_size=48, resize="pad"))
    if ood is not None:
        ckpt["ood"] = ood
    return ckpt


@pytest.fixture
def real_folder(real_samples, tmp_path) -> Path:
    """The real crystal crops as class folders ``cex/`` and ``pg/`` (a temporary copy)."""
    for path in real_samples.glob("*.png"):
        cls = {"CEX": "cex", "PG": "pg"}.get(path.name.split(" ")[0])
        if cls:
            (tmp_path / "real" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / "real" / cls / path.name)
    return tmp_path / "real"


# ---- copied from tests/test_train.py (evaluate against train's own report) ---------------

def test_evaluate_reproduces_the_test_numbers(e2e_run, split, tmp_path):
    result = RUNNER.invoke(app, ["evaluate", str(e2e_run / "weights" / "best.ckpt"), str(split / "test"),
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    trained = json.loads((e2e_run / "test_results.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "test_results.json").read_text())
    for key in ("accuracy", "per_class", "macro", "weighted", "confusion_matrix", "n_missed", "temperature"):
        assert evaluated[key] == trained[key], key
    assert evaluated["roc_auc"] == pytest.approx(trained["roc_auc"], abs=1e-6)
    # training's report and evaluate may batch the images otherwise: confidences within float noise
    assert_rows_close(_csv_rows(tmp_path / "eval" / "misclassified.csv"), _csv_rows(e2e_run / "misclassified.csv"))
    assert evaluated["rejection"]["n_rejected"] == trained["rejection"]["n_rejected"]


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_rejects_foreign_class_folders(e2e_run, tmp_path):
    make_split(tmp_path / "other", counts={"test": (2, 2)})
    (tmp_path / "other" / "test" / "PG").rename(tmp_path / "other" / "test" / "needles")
    result = RUNNER.invoke(app, ["evaluate", str(e2e_run / "weights" / "best.ckpt"), str(tmp_path / "other" / "test"),
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2
    assert "needles" in result.output and "cex, pg" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_warns_on_the_training_split(e2e_run, split, tmp_path):
    result = RUNNER.invoke(app, ["evaluate", str(e2e_run / "weights" / "best.ckpt"), str(split / "train"),
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "trained on" in result.output
    meta = json.loads((tmp_path / "eval" / "test_results.json").read_text())["meta"]
    assert "trained on" in meta["warning"]


# ---- the Predictor path ------------------------------------------------------------------

def test_evaluate_gives_the_probabilities_of_predict(real_folder, tmp_path):
    """The report's decisions and confidences are Predictor.predict's on the same real crops."""
    ckpt_path = save_checkpoint(tiny_checkpoint(), tmp_path / "m.ckpt")
    result = evaluate_checkpoint(ckpt_path, real_folder, tmp_path / "eval", device="cpu", progress=False)
    folder = index_folder(real_folder, class_names=["cex", "pg"])
    predicted = Predictor.load(ckpt_path, device="cpu").predict(folder.paths)
    confidences = [p.confidence for p in predicted]
    assert max(confidences) - min(confidences) > 1e-3  # the images get different answers: the test can fail
    cm = np.zeros((2, 2), int)
    for true, p in zip(folder.labels, predicted):
        cm[true, ["cex", "pg"].index(p.predicted)] += 1
    assert result["confusion_matrix"] == cm.tolist()
    missed = list(csv.DictReader(io.StringIO((tmp_path / "eval" / "misclassified.csv").read_text())))
    by_path = {p.path: p for p in predicted}
    assert len(missed) == result["n_missed"] > 0
    for row in missed:
        assert row["predicted"] == by_path[row["path"]].predicted
        assert float(row["confidence"]) == pytest.approx(by_path[row["path"]].confidence, abs=1e-6)


def test_folder_logits_are_predict_logits_to_1e6(real_folder):
    predictor = Predictor.from_checkpoint(tiny_checkpoint(), "cpu")
    paths = index_folder(real_folder).paths
    logits, scores = folder_logits(predictor, paths, batch_size=3)
    expected = np.array([[p.probabilities[c] for c in ("cex", "pg")] for p in predictor.predict(paths)])
    assert scores is None and logits.dtype == np.float32 and logits.shape == (7, 2)
    assert np.abs(softmax(logits.astype(np.float64), TEMPERATURE) - expected).max() < 1e-6


def test_rejection_scores_are_those_of_predict(real_folder, tmp_path):
    from PIL import Image

    from crystalscope.data.synth import DIFFICULTIES, render_cex
    from crystalscope.evaluation.ood import fit_detector, image_statistics

    plain = Predictor.from_checkpoint(tiny_checkpoint(), "cpu")
    rng = np.random.default_rng(0)
    resized = np.stack([plain.preprocessing.resize_uint8(Image.fromarray(render_cex(rng, DIFFICULTIES["realistic"])))
                        for _ in range(48)])
    logits, features = plain.logits_and_features(plain.preprocessing.normalize(resized))
    stats = image_statistics(resized)
    detector = fit_detector(features[:32], np.arange(32) % 2, features[32:], logits[32:], 2, 0.1,
                            train_image_stats=stats[:32], val_image_stats=stats[32:])
    ckpt_path = save_checkpoint(tiny_checkpoint(ood=detector.to_dict()), tmp_path / "ood.ckpt")
    result = evaluate_checkpoint(ckpt_path, real_folder, tmp_path / "eval", device="cpu", progress=False)
    loaded = Predictor.load(ckpt_path, device="cpu")
    paths = index_folder(real_folder).paths
    predicted = loaded.predict(paths)
    # evaluate's scores (folder_logits) are predict's, image by image, not only the count above the threshold
    _, scores = folder_logits(loaded, paths, batch_size=3)
    assert np.allclose(scores, [p.ood_score for p in predicted], rtol=1e-5)
    assert np.ptp(scores) > 0  # the images score differently: a mix-up would show
    assert result["rejection"]["n_rejected"] == sum(p.rejected for p in predicted)
    assert result["rejection"]["threshold"] == pytest.approx(detector.threshold)


# ---- options, defaults and the training-data warning -------------------------------------

def test_default_out_is_the_next_free_folder_and_bad_batch_size(real_folder, tmp_path, monkeypatch):
    ckpt_path = save_checkpoint(tiny_checkpoint(), tmp_path / "m.ckpt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "evaluate").mkdir(parents=True)
    evaluate_checkpoint(ckpt_path, real_folder, device="cpu", progress=False)
    assert (tmp_path / "runs" / "evaluate2" / "test_results.json").is_file()
    with pytest.raises(CrystalscopeError, match="--batch-size 0"):
        evaluate_checkpoint(ckpt_path, real_folder, tmp_path / "x", batch_size=0)
    assert not (tmp_path / "x").exists()


def test_training_data_warning_names_the_split(split):
    train, test = index_folder(split / "train"), index_folder(split / "test")
    ckpt = {"training": {"data_sha256": {"train": data_hash(train.root, train.paths),
                                         "val": data_hash(split / "val", index_folder(split / "val").paths),
                                         "test": data_hash(test.root, test.paths)}}}
    assert "trained on (its train split)" in training_data_warning(ckpt, train)
    assert "calibrated on (its val split)" in training_data_warning(ckpt, index_folder(split / "val"))
    assert training_data_warning(ckpt, test) is None
    assert training_data_warning({}, train) is None
