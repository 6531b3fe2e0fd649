"""The bf16 path: autocast, channels_last, and when to use them (one place for training, evaluation,
feature caching and the captured CUDA-graph step)."""

from __future__ import annotations

import torch


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether steps run under bf16 autocast with channels_last: ``auto`` means on CUDA only.

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


def model_input(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """channels_last for image batches on the bf16 path (what tensor-core convolutions want)."""
    return x.contiguous(memory_format=torch.channels_last) if bf16 and x.dim() == 4 else x
