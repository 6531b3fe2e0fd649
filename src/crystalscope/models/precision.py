"""How tensors meet the model: bf16 autocast (when), and channels_last memory format (always).

One place for training, evaluation, feature caching, the captured CUDA-graph step and the
PyTorch predictor. channels_last is used on every device: on a GPU it is what tensor-core
convolutions want, and on the 2-core CPU it made a training step 1.6-1.7x faster for
efficientnet_lite0 at 160 px (83 -> 137 img/s), resnet18 at 160 px (93-101 -> 131-136) and
resnet50 (28-34 -> 49-50), and the frozen efficientnet_lite0 prefix 1.8-2x faster
(85-98 -> 173-178 img/s); resnet18 at 64 px was within noise (636-723 vs 673-780).
"""

from __future__ import annotations

import torch


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether steps run under bf16 autocast: ``auto`` means on CUDA only.

    Example:
        >>> use_bf16(torch.device("cpu")), use_bf16(torch.device("cpu"), "bf16")
        (False, True)
    """
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast (no loss scaling needed, unlike fp16; what the H200 is fastest at).

    ``cache_enabled=False``: a CUDA graph must not keep autocast's cast weights across its
    capture; each step casts every weight once anyway, so the cache saves nothing here.
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)


def model_input(x: torch.Tensor) -> torch.Tensor:
    """Image batches (4-D) in channels_last; features (2-D) as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def place_model(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` on ``device`` with its convolution weights in channels_last."""
    return model.to(device, memory_format=torch.channels_last)
