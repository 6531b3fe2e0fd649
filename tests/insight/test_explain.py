"""Grad-CAM: overlays and sheet are real pictures, the heat sits where the evidence is, the
letterbox is undone, and bad inputs follow the project's rules."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from crystalscope import Predictor
from crystalscope.cli import app
from crystalscope.data.transforms import Preprocessing
from crystalscope.insight.explain import (EXPLAIN_CSV, SHEET_PNG, default_target_layer, explain_batch,
                                          heatmap_on_image)
from crystalscope.models.factory import CrystalClassifier, HeadSpec, build_model
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint

SIZE = 48


def tiny_checkpoint(backbone: str, resize: str = "pad") -> dict:
    """Untrained timm model (fixed seed) with a sharpened last layer so the classes differ."""
    torch.manual_seed(0)
    model = build_model(backbone, 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)
    return make_checkpoint(model, backbone=backbone, head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=Preprocessing(image_size=SIZE, resize=resize))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain-models")
    return {name: save_checkpoint(tiny_checkpoint(name), root / f"{name}.ckpt")
            for name in ("resnet18", "efficientnet_lite0")}


def blob_picture(width: int, height: int, centre: tuple[int, int], radius: float = 5.0) -> Image.Image:
    """Dark noisy frame with one bright blob at ``centre`` (x, y)."""
    rng = np.random.default_rng(width * 7 + height)
    yy, xx = np.mgrid[0:height, 0:width]
    grey = 30 + rng.normal(0, 4, (height, width))
    grey += 210 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * radius ** 2))
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


# ---- a model whose answer is known: the "pg" logit is the mean brightness above grey ---------


class BrightnessBackbone(nn.Module):
    """timm-like backbone at full resolution: one 1x1 conv reading brightness, ReLU, mean pool."""

    num_features = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.act = nn.ReLU()
        with torch.no_grad():  # normalised dark background < 0 -> 0 after ReLU; the blob > 0
            self.conv.weight.fill_(1 / 3)
            self.conv.bias.fill_(-0.5)

    def forward_features(self, x):
        return self.act(self.conv(x))

    def forward_head(self, x):
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class KnownBackend:
    """The Predictor's PyTorch back-end contract around the hand-made model."""

    name = "torch"
    device = torch.device("cpu")

    def __init__(self, resize: str):
        head = nn.Sequential(nn.Linear(1, 2))
        with torch.no_grad():
            head[0].weight.copy_(torch.tensor([[-4.0], [4.0]]))
            head[0].bias.zero_()
        self.model = CrystalClassifier(BrightnessBackbone(), head).eval()
        self.meta = {"class_names": ["cex", "pg"], "positive_class": "pg", "temperature": 1.0,
                     "backbone": "brightness", "preprocessing": Preprocessing(image_size=SIZE, resize=resize).to_dict()}


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_heat_is_on_the_blob_in_original_coordinates(resize):
    # wide image, blob near the top-left: a letterbox offset that is not undone moves the peak
    # down by ~12 px, a wrong scale moves it sideways
    image = blob_picture(160, 60, centre=(30, 12))
    predictor = Predictor(KnownBackend(resize), "<known>")
    result = explain_batch(predictor, [image])[0]
    assert result.ok and result.predicted == "pg" and result.target == "pg"
    assert result.heatmap.shape == (60, 160)
    y, x = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
    assert abs(x - 30) <= 4 and abs(y - 12) <= 4, (x, y)
    assert result.heatmap[:, 80:].max() < 0.05  # the empty right half holds no evidence
    assert result.overlay.size == image.size
    # the overlay is tinted where the heat is, and left alone where it is not
    before, after = np.asarray(image, float), np.asarray(result.overlay, float)
    assert np.abs(after[12, 30] - before[12, 30]).sum() > 60
    assert np.abs(after[40, 120] - before[40, 120]).sum() < 3


def test_chosen_class_with_no_evidence_gives_an_empty_map():
    predictor = Predictor(KnownBackend("pad"), "<known>")
    result = explain_batch(predictor, [blob_picture(64, 64, (20, 40))], target_class="cex")[0]
    assert result.target == "cex" and result.predicted == "pg"
    assert result.target_probability == pytest.approx(1 - result.confidence)
    assert result.heatmap.max() == 0.0  # brightness only ever argues for pg


def test_pad_area_never_reaches_the_original():
    pre = Preprocessing(image_size=SIZE, resize="pad")
    left, top, width, height = pre.content_box((100, 40))
    assert (left, top, width, height) == (0, 14, 48, 19)
    in_pad = np.ones((SIZE, SIZE), np.float32)
    in_pad[top:top + height, left:left + width] = 0.0  # all the heat in the letterbox bars
    assert heatmap_on_image(in_pad, pre, (100, 40)).max() == 0.0
    in_content = 1.0 - in_pad
    assert heatmap_on_image(in_content, pre, (100, 40)).min() == pytest.approx(1.0)
    # content_box is the rule resize_image letterboxes by
    canvas = np.asarray(pre.resize_image(Image.new("RGB", (100, 40), (255, 255, 255))))
    assert canvas[top:top + height, left:left + width].min() == 255
    assert canvas[:top].max() == 0 and canvas[top + height:].max() == 0


@pytest.mark.parametrize("backbone,layer", [("resnet18", "backbone.layer4"), ("resnet101", "backbone.layer4"),
                                            ("efficientnet_lite0", "backbone.bn2")])
def test_default_layer_is_the_last_feature_map_before_pooling(backbone, layer):
    model = build_model(backbone, 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert default_target_layer(model, image_size=32) == layer
    # the probe forward pass leaves a model in training untouched (mode and batch-norm statistics)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the command ------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_explain_writes_overlays_sheet_and_csv(checkpoints, tmp_path, backbone):
    images = tmp_path / "images"
    (images / "pg").mkdir(parents=True)
    blob_picture(70, 50, (20, 20)).save(images / "pg" / "PG (1).png")
    blob_picture(64, 64, (40, 30)).save(images / "CEX (1).png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "cam"
    result = CliRunner().invoke(app, ["explain", str(checkpoints[backbone]), str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 errors" in result.output and "broken.png" in result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out / EXPLAIN_CSV)}
    assert rows["broken.png"]["status"].startswith("error: ") and rows["broken.png"]["overlay"] == ""
    for name, size in (("PG (1).png", (70, 50)), ("CEX (1).png", (64, 64))):
        assert rows[name]["status"] == "ok" and rows[name]["predicted"] in ("cex", "pg")
        with Image.open(out / rows[name]["overlay"]) as overlay:
            assert overlay.size == size
            assert np.asarray(overlay).std() > 5
    with Image.open(out / SHEET_PNG) as sheet:
        assert sheet.width >= 3 * 150 and np.asarray(sheet).std() > 5
    # a rerun needs --force to replace the earlier explain, and --class picks the class to explain
    refused = CliRunner().invoke(app, ["explain", str(checkpoints[backbone]), str(images / "pg"),
                                       "--out", str(out), "--class", "cex"])
    assert refused.exit_code == 2 and "--force" in refused.output
    again = CliRunner().invoke(app, ["explain", str(checkpoints[backbone]), str(images / "pg"),
                                     "--out", str(out), "--class", "cex", "--force"])
    assert again.exit_code == 0, again.output
    assert [r["target"] for r in read_csv(out / EXPLAIN_CSV)] == ["cex"]
    assert not (out / rows["CEX (1).png"]["overlay"]).exists()


def test_onnx_model_gets_one_line_pointing_at_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.ckpt").write_bytes(b"")
    (run / "model.onnx").write_bytes(b"")
    blob_picture(40, 40, (20, 20)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["explain", str(run / "model.onnx"), str(tmp_path / "a.png"),
                                      "--out", str(tmp_path / "cam")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert ".ckpt" in lines[0] and str(run / "weights" / "best.ckpt") in lines[0]
    assert not (tmp_path / "cam").exists()


def test_bad_outputs_and_options_are_one_line_errors(checkpoints, tmp_path):
    blob_picture(40, 40, (20, 20)).save(tmp_path / "a.png")
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me too")
    ckpt, image = str(checkpoints["resnet18"]), str(tmp_path / "a.png")
    cases = [(["--out", str(taken)], "is a file"),
             (["--out", str(other)], "crystalscope did not write"),
             (["--out", str(tmp_path / "a.png")], "is the input"),
             (["--out", str(tmp_path / "x"), "--class", "cat"], "--class 'cat'"),
             (["--out", str(tmp_path / "y"), "--layer", "backbone.fc"], "4-D feature map")]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["explain", ckpt, image, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["explain", ckpt, str(tmp_path / "gone.png"), "--out", str(tmp_path / "z")])
    assert missing.exit_code == 2 and "gone.png" in missing.output
    assert taken.read_text() == "keep me" and (other / "notes.txt").read_text() == "keep me too"
