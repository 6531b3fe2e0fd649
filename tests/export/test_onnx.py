"""ONNX export: metadata, dynamic batch, and a parity check that really catches a drifted export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from crystalscope.cli import app  # noqa: E402
from crystalscope.data.transforms import Preprocessing  # noqa: E402
from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.export import onnx as export_onnx  # noqa: E402
from crystalscope.models.factory import HeadSpec, build_model  # noqa: E402
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402

IMAGE_SIZE = 48
TEMPERATURE = 1.7


def tiny_checkpoint(resize: str = "stretch", temperature: float = TEMPERATURE) -> dict:
    """Untrained resnet18 whose last layer is scaled up so logits differ clearly per image."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # untrained logits are ~0: make the parity test bite
    return make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=temperature,
                           preprocessing=Preprocessing(image_size=IMAGE_SIZE, resize=resize))


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "best.ckpt"
    save_checkpoint(tiny_checkpoint("pad"), path)
    return path


def test_export_writes_onnx_with_metadata_and_dynamic_batch(ckpt_path, real_samples, tmp_path):
    out = tmp_path / "model.onnx"
    checks = sorted(real_samples.glob("*.png"))
    result = export_onnx.export_checkpoint(ckpt_path, out, check_images=checks)

    assert result["path"] == str(out) and out.is_file()
    assert result["n_checked"] == len(checks) == 8  # the cat photo is a check image too
    assert 0.0 <= result["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    # no fitted rejection in this checkpoint: no ood_score/accepted outputs
    assert [o.name for o in proto.graph.output] == ["logits", "features", "probabilities"]
    assert meta_features_name(proto) == "features"
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["crystalscope"])
    assert meta["class_names"] == ["cex", "pg"]
    assert meta["positive_class"] == "pg"
    assert meta["backbone"] == "resnet18"
    assert meta["temperature"] == pytest.approx(TEMPERATURE)
    assert meta["preprocessing"] == Preprocessing(image_size=IMAGE_SIZE, resize="pad").to_dict()
    assert meta["input_shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    # the batch axis really is dynamic: 3 images in, 3 rows of logits out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)})[0]
    assert logits.shape == (3, 2)
    assert not list(tmp_path.glob(".*tmp"))  # no staging file left behind


def test_cli_export_defaults_next_to_checkpoint(ckpt_path):
    result = CliRunner().invoke(app, ["export", str(ckpt_path)])
    assert result.exit_code == 0, result.output
    assert ckpt_path.with_suffix(".onnx").is_file()
    assert "max probability difference" in result.output
    assert "5 images" in result.output  # the generated check images (RGB, L, RGBA, 16-bit)


def test_parity_check_fails_on_a_drifted_export(ckpt_path, tmp_path, monkeypatch):
    """Export a slightly different model than the checkpoint's: the check must refuse it."""
    real_export = export_onnx._export_graph

    def drifted_export(model, image_size, opset):
        import copy

        drifted = copy.deepcopy(model)
        with torch.no_grad():
            drifted.classifier.head[-1].bias.add_(torch.tensor([0.0, 0.01]))  # ~2e-3 in probability
        return real_export(drifted, image_size, opset)

    monkeypatch.setattr(export_onnx, "_export_graph", drifted_export)
    out = tmp_path / "model.onnx"
    with pytest.raises(CrystalscopeError, match=r"differ by .*not written"):
        export_onnx.export_checkpoint(ckpt_path, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_parity_check_rejects_perturbed_outputs(ckpt_path, tmp_path, monkeypatch):
    """The same check at the output level: +2e-3 on one logit (~3e-4 in probability) is caught."""
    real_load = export_onnx._load_export

    def perturbed(path, reject=False):
        exported = real_load(path, reject)
        logits = exported.backend.logits
        exported.backend.logits = lambda batch: logits(batch) + np.array([0.0, 2e-3], np.float32)
        return exported

    monkeypatch.setattr(export_onnx, "_load_export", perturbed)
    with pytest.raises(CrystalscopeError, match="export check failed"):
        export_onnx.export_checkpoint(ckpt_path, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_parity_check_compares_against_the_predictor_path(ckpt_path, real_samples, tmp_path, monkeypatch):
    """The PyTorch side of the check is Predictor (the forward of predict/evaluate), on the check images."""
    from crystalscope.inference.predictor import Predictor
    from crystalscope.models.checkpoint import load_checkpoint

    seen = []
    real_probabilities = Predictor.probabilities

    def spy(self, batch):
        probs = real_probabilities(self, batch)
        seen.append((self.backend_name, probs))
        return probs

    monkeypatch.setattr(Predictor, "probabilities", spy)
    checks = sorted(real_samples.glob("*.png"))
    export_onnx.export_checkpoint(ckpt_path, tmp_path / "m.onnx", check_images=checks)
    torch_side = [probs for backend, probs in seen if backend == "torch"]
    assert len(torch_side) == 1 and [b for b, _ in seen].count("onnx") == 2
    monkeypatch.undo()
    predicted = Predictor.from_checkpoint(load_checkpoint(ckpt_path), "cpu").predict(checks)
    expected = np.array([[p.probabilities[c] for c in ("cex", "pg")] for p in predicted])
    assert np.abs(torch_side[0] - expected).max() < 1e-6
    assert np.abs(expected[:, 0] - expected[:, 0].mean()).max() > 1e-3  # the images really differ


def test_cli_export_one_line_errors(tmp_path, ckpt_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(text)])
    assert result.exit_code == 2
    assert "not a readable crystalscope checkpoint" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["export", str(tmp_path / "missing.ckpt")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output

    result = runner.invoke(app, ["export", str(ckpt_path), "--opset", "5", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--opset 5" in result.output
    assert not (tmp_path / "m.onnx").exists()


def meta_features_name(proto) -> str:
    return json.loads({p.key: p.value for p in proto.metadata_props}["crystalscope"])["features_name"]
