"""When steps run under bf16 autocast (models/precision.py)."""

import torch

from crystalscope.models.precision import use_bf16


def test_use_bf16_follows_precision_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [use_bf16(cpu), use_bf16(cuda), use_bf16(cuda, "fp32"), use_bf16(cpu, "bf16")] \
        == [False, True, False, True]
