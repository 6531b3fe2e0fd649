"""How tensors meet the model: bf16 autocast (when), and channels_last memory format (always).

One place for training, evaluation, feature caching, the captured CUDA-graph step and the
PyTorch predictor. channels_last is used on every device: on a GPU it is what tensor-core
convolutions want, and on the CPU it made the training steps and the frozen prefix faster too
(measured figures: docs/benchmarks.md, "channels_last").

Precision policy: bf16 autocast (:func:`use_bf16`, on CUDA by default) is for the training
steps and the per-epoch validation; the numbers a run reports (temperature, test report,
rejection) and every inference path run in fp32.
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
