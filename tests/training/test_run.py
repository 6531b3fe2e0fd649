"""End-to-end training on tiny generated splits: every deliverable, evaluate, resume, names.

Data: dark 36 px images with bright horizontal lines (CEX) or one bright disc (PG), written
with numpy + PIL into train/val/test class folders named ``CEX`` and ``PG`` (upper case, as in
the real dataset, so the lower-cased class names are checked too). The test split has 10 CEX
and 6 PG files, so swapped class names would show up in the per-class supports.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data import dataset
from crystalscope.data.transforms import Preprocessing
from crystalscope.formats import metrics_columns
from crystalscope.safety import next_run_dir
from lines_and_discs import make_split

RUNNER = CliRunner()


def train_cli(*args: str):
    result = RUNNER.invoke(app, ["train", *args])
    return result


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("data") / "split")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def e2e_run(split, cache_dir, tmp_path_factory) -> Path:
    """The done-when command: resnet18, no pretrained weights, 64 px, 2 epochs."""
    out = tmp_path_factory.mktemp("runs") / "RUN"
    result = train_cli(str(split), "--backbone", "resnet18", "--weights", "none", "--image-size", "64",
                       "--epochs", "2", "--f1-threshold", "1.1", "--out", str(out), "--cache-dir", str(cache_dir))
    assert result.exit_code == 0, result.output
    assert re.search(r"cex - Precision: \d\.\d{4}, Recall: \d\.\d{4}, F1-Score: \d\.\d{4}", result.output)
    return out


@pytest.fixture(scope="module")
def feature_run(split, cache_dir, tmp_path_factory) -> Path:
    """--cache-features on a frozen random resnet18 (its 64 px features separate lines from discs)."""
    out = tmp_path_factory.mktemp("runs") / "FEAT"
    result = train_cli(str(split), "--backbone", "resnet18", "--weights", "none", "--image-size", "64",
                       "--trainable-fraction", "0", "--cache-features", "--lr", "0.01", "--batch-size", "16",
                       "--epochs", "20", "--f1-threshold", "1.1", "--out", str(out), "--cache-dir", str(cache_dir),
                       "--no-onnx")
    assert result.exit_code == 0, result.output
    assert "features cached" in result.output
    return out


# ---- the run folder ----------------------------------------------------------------------

DELIVERABLES = ["config.yaml", "metrics.csv", "weights/best.ckpt", "weights/last.ckpt", "test_results.txt",
                "test_results.json", "confusion_matrix.png", "roc_auc.png", "calibration.png",
                "misclassified.csv", "misclassified.png", "metrics_plot.png", "model.onnx"]


def test_run_writes_every_deliverable(e2e_run):
    missing = [name for name in DELIVERABLES if not (e2e_run / name).is_file()]
    assert not missing
    for png in e2e_run.glob("*.png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100, png
            assert np.asarray(img.convert("L")).std() > 1  # not a blank canvas
    assert not list(e2e_run.rglob("*.tmp")), "no temporary files left behind"


def test_metrics_csv_has_one_row_per_epoch_with_agreed_columns(e2e_run):
    rows = list(csv.DictReader(io.StringIO((e2e_run / "metrics.csv").read_text())))
    header = (e2e_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == metrics_columns(["cex", "pg"])
    assert header[:6] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"]
    assert header[-3:] == ["val_weighted_f1", "lr", "epoch_time_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["lr"]) == 0.1 and float(r["epoch_time_s"]) > 0
        assert 0 <= float(r["val_f1_pg"]) <= 1 and float(r["train_loss"]) > 0


def test_test_results_have_four_decimal_class_rows(e2e_run):
    text = (e2e_run / "test_results.txt").read_text()
    for name in ("cex", "pg"):
        assert re.search(rf"^\s*{name}\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d+", text, re.M), text
    result = json.loads((e2e_run / "test_results.json").read_text())
    assert result["class_names"] == ["cex", "pg"] and result["positive_class"] == "pg"
    assert result["n_images"] == 16


def test_checkpoints_are_self_describing_and_weights_only(e2e_run):
    last = torch.load(e2e_run / "weights" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(e2e_run / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["backbone"] == "resnet18" and last["class_names"] == ["cex", "pg"]
    assert last["preprocessing"]["image_size"] == 64 and last["preprocessing"]["resize"] == "stretch"
    training = last["training"]
    assert training["epoch"] == 2 and training["config"]["epochs"] == 2
    assert training["optimizer"]["state"], "optimizer momentum buffers are saved"
    assert training["stopping"]["best_epoch"] in (1, 2)
    assert best["training"]["epoch"] == training["stopping"]["best_epoch"]
    results = json.loads((e2e_run / "test_results.json").read_text())
    assert best["temperature"] == pytest.approx(results["temperature"])


def test_rejection_is_fitted_stored_and_reported(e2e_run, feature_run, split, tmp_path):
    from crystalscope import Predictor

    for run in (e2e_run, feature_run):  # whole model, and head-only on cached features
        best = torch.load(run / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
        assert best["ood"]["method"] == "mahalanobis+image_statistics" and best["ood"]["target_fpr"] == 0.01
        rejection = json.loads((run / "test_results.json").read_text())["rejection"]
        assert rejection["threshold"] == pytest.approx(best["ood"]["threshold"])
        assert "Rejection of foreign images" in (run / "test_results.txt").read_text()
        # the report's count is what Predictor does with the stored parameters
        files = sorted((split / "test").rglob("*.png"))
        predictions = Predictor.load(run / "weights" / "best.ckpt", device="cpu").predict(files)
        assert sum(p.rejected for p in predictions) == rejection["n_rejected"]
    evaluated = RUNNER.invoke(app, ["evaluate", str(e2e_run / "weights" / "best.ckpt"), str(split / "test"),
                                    "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((tmp_path / "eval" / "test_results.json").read_text())["rejection"]
    assert again["n_rejected"] == json.loads((e2e_run / "test_results.json").read_text())["rejection"]["n_rejected"]


def test_unreadable_image_names_the_file_and_leaves_no_run(tmp_path, cache_dir):
    root = make_split(tmp_path / "s", counts={"train": (3, 3), "val": (2, 2), "test": (2, 2)})
    broken = root / "train" / "PG" / "PG (2).png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = train_cli(str(root), "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
                       "--out", str(tmp_path / "run"), "--cache-dir", "off")
    assert result.exit_code == 2
    assert "PG (2).png" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_split(tmp_path / "s", counts={"train": (3, 3)})
    folder = dataset.index_folder(root / "train")
    assert folder.class_names == ["cex", "pg"] and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    pre = Preprocessing(image_size=24, resize="pad")
    first = dataset.load_images(folder.paths, pre, cache_dir=tmp_path / "c", progress=False)
    assert first.shape == (6, 24, 24, 3) and first.dtype == np.uint8
    assert np.array_equal(first[4], pre.resize_uint8(folder.paths[4]))
    assert len(list((tmp_path / "c").glob("images-*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(dataset, "decode_images", no_decoding)
    assert np.array_equal(dataset.load_images(folder.paths, pre, cache_dir=tmp_path / "c"), first)
    other_size = Preprocessing(image_size=20)
    assert dataset.cache_key(folder.paths, other_size) != dataset.cache_key(folder.paths, pre)
    before = dataset.cache_key(folder.paths, pre)
    Image.new("RGB", (36, 36), (9, 9, 9)).save(folder.paths[0])
    assert dataset.cache_key(folder.paths, pre) != before  # a changed file changes the key


def test_default_out_never_overwrites(tmp_path, monkeypatch, split):
    monkeypatch.chdir(tmp_path)
    assert next_run_dir() == Path("runs/train")
    (tmp_path / "runs" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "train2").mkdir()
    assert next_run_dir() == Path("runs/train3")
    (tmp_path / "runs" / "train" / "config.yaml").write_text("x: 1\n")
    result = train_cli(str(split), "--out", "runs/train", "--weights", "none")
    assert result.exit_code == 2 and "not empty" in result.output and "--resume" in result.output


def test_frozen_batchnorm_stays_in_eval_mode():
    from crystalscope.models.factory import build_model, set_trainable_fraction
    from crystalscope.training.loop import train_mode

    model = build_model("resnet18", 2)
    set_trainable_fraction(model.backbone, 0.1)
    train_mode(model)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    frozen = [m for m in norms if not m.weight.requires_grad]
    assert frozen and all(not m.training for m in frozen)
    assert all(m.training for m in norms if m.weight.requires_grad)
    assert model.head.training
    before = frozen[0].running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(frozen[0].running_mean, before)  # ImageNet statistics untouched


def test_three_classes_yaml_config_and_cli_override(tmp_path, cache_dir):
    root = make_split(tmp_path / "s", counts={"train": (8, 8), "val": (4, 4), "test": (4, 4)})
    for split in ("train", "val", "test"):  # a third class: the CEX images turned upside down
        (root / split / "rods").mkdir()
        for f in (root / split / "CEX").glob("*.png"):
            Image.open(f).transpose(Image.Transpose.ROTATE_90).save(root / split / "rods" / f.name)
    config = tmp_path / "recipe.yaml"
    config.write_text("backbone: resnet18\nweights: none\nepochs: 5\nresize: pad\nimage-size: 64\n"
                      "trainable_fraction: 0\ncache_features: true\nbatch_size: 8\n")
    out = tmp_path / "run"
    result = train_cli(str(root), "--config", str(config), "--epochs", "2", "--out", str(out),
                       "--cache-dir", str(cache_dir), "--no-onnx")
    assert result.exit_code == 0, result.output
    saved = (out / "config.yaml").read_text()
    assert "epochs: 2" in saved and "backbone: resnet18" in saved and "resize: pad" in saved
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(metrics_columns(["cex", "pg", "rods"]))
    results = json.loads((out / "test_results.json").read_text())
    assert results["class_names"] == ["cex", "pg", "rods"] and results["n_images"] == 12
    best = torch.load(out / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["preprocessing"]["resize"] == "pad" and best["positive_class"] is None
