"""Feature caching (training/features.py): the frozen part cut, its memory guard."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.errors import CrystalscopeError
from crystalscope.models.factory import build_model, set_trainable_fraction
from crystalscope.training import features
from crystalscope.training.features import backbone_parts, check_feature_memory, split_for_caching
from lines_and_discs import make_split

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("data") / "split",
                      counts={"train": (12, 12), "val": (6, 6), "test": (6, 6)})


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_cached_prefix_then_trained_tail_equals_the_full_model(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, 2).eval()
    set_trainable_fraction(model.backbone, 0.1)
    prefix, trained = split_for_caching(model, 32)
    assert any(p.requires_grad for p in trained.parameters())
    assert not any(p.requires_grad for p in prefix.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trained(prefix(x)), model(x), atol=1e-5)
    # the tail shares the model's modules: training it changes the model
    assert any(t is m for t in trained.modules() for m in model.backbone.modules() if list(m.parameters(False)))


def test_split_for_caching_frozen_backbone_is_the_plain_feature_cache():
    model = build_model("resnet18", 2)
    set_trainable_fraction(model.backbone, 0.0)
    prefix, trained = split_for_caching(model, 32)
    assert prefix is model.backbone and trained is model.head
    assert len(backbone_parts(model.backbone)) == 14


def test_split_for_caching_refuses_a_fully_trainable_backbone():
    model = build_model("resnet18", 2)
    set_trainable_fraction(model.backbone, 1.0)
    with pytest.raises(CrystalscopeError, match="nothing can be cached"):
        split_for_caching(model, 32)


# ---- the feature-cache memory guard ----------------------------------------------------------

def test_feature_memory_estimate_counts_maps_passes_and_the_concatenation(monkeypatch):
    model = build_model("resnet18", 2)
    set_trainable_fraction(model.backbone, 0.1)  # cut after layer4.0: 512 x 2 x 2 maps at 64 px
    prefix, _ = split_for_caching(model, 64)
    monkeypatch.setattr(features, "available_memory", lambda device: 10**12)
    rows = {"train": 200, "val": 50, "test": 30}
    peak = check_feature_memory(prefix, 64, rows, torch.device("cpu"))
    assert peak == 512 * 2 * 2 * 4 * (280 + 200)  # float32, every row + the train rows again


def test_cache_frozen_that_would_not_fit_stops_before_decoding(small_split, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "available_memory", lambda device: 1_000_000)  # 1 MB free
    decoded = []
    monkeypatch.setattr("crystalscope.training.setup.load_images", lambda *a, **k: decoded.append(1))
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", str(small_split), "--backbone", "resnet18", "--weights", "none",
                                 "--image-size", "64", "--trainable-fraction", "0.1", "--cache-frozen",
                                 "--feature-passes", "3", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # 24 train images x 3 passes + 24 val/test = 96 rows, plus the 72 train rows again while concatenated:
    # 8,192 bytes x 168 = 1.3 MiB
    assert ("error: --cache-frozen: the cached features (512 x 2 x 2 floats per image, 96 images) need about "
            "1.3 MiB but only 1.0 MiB of cpu memory is free; use a smaller --image-size, fewer --feature-passes, "
            "a lower --trainable-fraction (the cut moves later), or no caching") in " ".join(result.output.split())
    assert not decoded and not out.exists()
