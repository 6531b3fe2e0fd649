"""Model factory: a timm backbone plus the reference study's classification head.

The model carries its own preprocessing (:func:`default_preprocessing` reads mean, std and
interpolation from timm's pretrained config for the backbone), so a checkpoint saved from it
knows exactly how its inputs must look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError


@dataclass
class HeadSpec:
    """The head on top of the backbone's globally pooled features.

    Default = the reference study: Linear 512, ReLU, BatchNorm, Dropout 0.4, Linear 256,
    ReLU, Dropout 0.3, Linear to the classes.
    """

    hidden: list[int] = field(default_factory=lambda: [512, 256])
    dropout: list[float] = field(default_factory=lambda: [0.4, 0.3])
    batchnorm_after_first: bool = True

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": list(self.dropout),
                "batchnorm_after_first": bool(self.batchnorm_after_first)}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        return cls(hidden=list(d.get("hidden", [512, 256])), dropout=list(d.get("dropout", [0.4, 0.3])),
                   batchnorm_after_first=bool(d.get("batchnorm_after_first", True)))


def build_head(in_features: int, num_classes: int, spec: HeadSpec) -> nn.Sequential:
    """Build the MLP head described by ``spec``."""
    if len(spec.dropout) != len(spec.hidden):
        raise CrystalscopeError("head: `dropout` needs one value per `hidden` layer")
    layers: list[nn.Module] = []
    width = in_features
    for i, (units, p) in enumerate(zip(spec.hidden, spec.dropout)):
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
        if i == 0 and spec.batchnorm_after_first:
            layers.append(nn.BatchNorm1d(units))
        layers.append(nn.Dropout(p))
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class CrystalClassifier(nn.Module):
    """timm backbone (global-average pooled features) + MLP head -> class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the head's input to its last Linear layer, shape (N, D).

        The one definition of "the model's features" for rejection, embedding maps and drift.
        """
        return self.head[:-1](self.backbone(x))


def create_backbone(name: str) -> nn.Module:
    """A timm backbone with its classifier removed (returns pooled features)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise CrystalscopeError(
                f"--backbone {name!r} is not a timm model: try resnet18, resnet50, resnet101 "
                "or efficientnet_lite0 (`python -c 'import timm; print(timm.list_models())'`)"
            ) from None
        raise


def build_model(backbone_name: str, num_classes: int, head: HeadSpec | None = None) -> CrystalClassifier:
    """Create the classifier with randomly initialised weights (load weights separately).

    Example:
        >>> model = build_model("resnet18", num_classes=2)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2])
    """
    if num_classes < 2:
        raise CrystalscopeError("a classifier needs at least 2 classes")
    backbone = create_backbone(backbone_name)
    return CrystalClassifier(backbone, build_head(backbone.num_features, num_classes, head or HeadSpec()))


def default_preprocessing(backbone_name: str, image_size: int = 224, resize: str = "stretch") -> Preprocessing:
    """Mean, std and interpolation from timm's pretrained config for ``backbone_name``."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(backbone_name)
    except Exception:  # unknown name or no pretrained cfg: fall back to ImageNet defaults
        cfg = None
    mean = tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    interpolation = getattr(cfg, "interpolation", None) or "bilinear"
    if interpolation not in ("nearest", "bilinear", "bicubic", "lanczos"):
        interpolation = "bilinear"
    return Preprocessing(image_size=image_size, mean=mean, std=std, resize=resize,
                         interpolation=interpolation)


def set_trainable_fraction(backbone: nn.Module, fraction: float) -> tuple[int, int]:
    """Freeze all but the last ``fraction`` of the backbone's layers (Keras-style counting).

    A "layer" is a module that owns parameters directly (conv, batch norm, linear), in
    definition order. Returns ``(trainable_layers, total_layers)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise CrystalscopeError(f"--trainable-fraction {fraction} must be between 0 and 1")
    layers = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    n_train = int(round(len(layers) * fraction))
    first_trainable = len(layers) - n_train
    for i, module in enumerate(layers):
        for p in module.parameters(recurse=False):
            p.requires_grad = i >= first_trainable
    return n_train, len(layers)
