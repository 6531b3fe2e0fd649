"""models/factory.py: the head, the classifier (forward and embed), backbones, preprocessing, freezing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from crystalscope.errors import CrystalscopeError
from crystalscope.models.factory import (
    CrystalClassifier,
    HeadSpec,
    build_head,
    build_model,
    create_backbone,
    default_preprocessing,
    set_trainable_fraction,
)


def test_head_spec_round_trips_and_fills_missing_keys_with_the_reference_head():
    spec = HeadSpec(hidden=[64], dropout=[0.1], batchnorm_after_first=False)
    assert HeadSpec.from_dict(spec.to_dict()) == spec
    assert HeadSpec.from_dict({}) == HeadSpec() == HeadSpec([512, 256], [0.4, 0.3], True)


def test_the_default_head_is_the_reference_studys():
    head = build_head(40, 3, HeadSpec())
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[4].out_features, head[-1].out_features) == (40, 512, 256, 3)
    assert (head[3].p, head[6].p) == (0.4, 0.3)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in build_head(40, 2, HeadSpec([8], [0.0], False)))


def test_a_head_needs_one_dropout_per_hidden_layer():
    with pytest.raises(CrystalscopeError, match="head: `dropout` needs one value per `hidden` layer"):
        build_head(40, 2, HeadSpec(hidden=[8, 4], dropout=[0.1]))


def test_build_model_gives_logits_and_embed_gives_the_last_layers_input():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, HeadSpec(hidden=[16], dropout=[0.2])).eval()
    assert isinstance(model, CrystalClassifier)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(x), model.embed(x)
    assert logits.shape == (2, 3) and features.shape == (2, 16)
    with torch.no_grad():
        assert torch.allclose(model.head[-1](features), logits, atol=1e-6)


def test_build_model_needs_two_classes():
    with pytest.raises(CrystalscopeError, match="at least 2 classes"):
        build_model("efficientnet_lite0", 1)


def test_an_unknown_backbone_is_a_one_line_error_with_choices():
    with pytest.raises(CrystalscopeError, match=r"--backbone 'resnet_9000' is not a timm model: try resnet18"):
        create_backbone("resnet_9000")


def test_create_backbone_returns_pooled_features():
    backbone = create_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 32, 32)).shape == (1, backbone.num_features)


def test_default_preprocessing_follows_timms_pretrained_config():
    cfg = timm.models.get_pretrained_cfg("resnet18")
    pre = default_preprocessing("resnet18", 48, "pad")
    assert (pre.image_size, pre.resize) == (48, "pad")
    assert pre.mean == pytest.approx(tuple(cfg.mean)) and pre.std == pytest.approx(tuple(cfg.std))
    assert pre.interpolation == cfg.interpolation


def test_default_preprocessing_of_an_unknown_name_is_imagenets():
    pre = default_preprocessing("not_a_model", 32)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    assert pre.interpolation == "bilinear" and pre.resize == "stretch"


def _layers(backbone: nn.Module) -> list[nn.Module]:
    return [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]


def test_trainable_fraction_unfreezes_the_last_layers_only():
    backbone = create_backbone("efficientnet_lite0")
    n_train, total = set_trainable_fraction(backbone, 0.25)
    assert total == len(_layers(backbone)) and n_train == round(total * 0.25) > 0
    flags = [all(p.requires_grad for p in m.parameters(recurse=False)) for m in _layers(backbone)]
    assert flags == [False] * (total - n_train) + [True] * n_train  # a suffix, in definition order
    assert set_trainable_fraction(backbone, 0.0) == (0, total)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert set_trainable_fraction(backbone, 1.0) == (total, total)
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_trainable_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(CrystalscopeError, match=f"--trainable-fraction {fraction} must be between 0 and 1"):
        set_trainable_fraction(nn.Linear(2, 2), fraction)
