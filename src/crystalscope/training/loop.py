"""Plain training and evaluation loops over tensors already in memory.

The inputs are the decoded uint8 images of a split (or, with ``--cache-features``, the
backbone's features). Batches are drawn by index from that tensor, so there is no data
loader and no per-image Python work. On CUDA the whole split sits on the GPU when it fits
(else in pinned host memory, copied with ``non_blocking``), steps run under bf16 autocast with
``bf16=True`` (the default on CUDA; the CPU can run the same path, which is how the tests cover
it), image batches are channels_last on every device, and loss and accuracy are accumulated ON the device and read once per
epoch: no host-device synchronisation per step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from crystalscope.errors import CrystalscopeError
from crystalscope.models.precision import autocast, model_input, use_bf16
from crystalscope.training.steps import TrainStep

Transform = Callable[[torch.Tensor], torch.Tensor]


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except BatchNorm layers whose parameters are all frozen stay in eval.

    Why: Keras (the reference study) runs frozen BatchNorm layers in inference mode, so the
    frozen part of the backbone keeps the ImageNet statistics it was trained with. Letting
    those layers update their running mean/variance from small batches of microscope images
    would shift the features under the trainable layers while their weights cannot adapt.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def batches(n: int, batch_size: int, drop_last: bool = False, min_rows: int = 1):
    """Slices ``[start, stop)`` over ``n`` rows; ``drop_last`` drops a trailing partial batch.

    A trailing batch smaller than ``min_rows`` joins the one before it (BatchNorm cannot
    train on a single image, and skipping it would silently leave that image out).
    """
    starts = list(range(0, n, batch_size))
    if not drop_last and len(starts) > 1 and n - starts[-1] < min_rows:
        starts.pop()
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else n
        if drop_last and stop - start < batch_size:
            return
        yield slice(start, stop)


def to_device(inputs: torch.Tensor, index, device: torch.device) -> torch.Tensor:
    """Rows ``index`` of ``inputs`` on ``device`` (async copy from pinned memory on CUDA)."""
    batch = inputs[index]
    if batch.device != device:
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
    return batch


def train_one_epoch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    optimizer: torch.optim.Optimizer, *, transform: Transform, batch_size: int,
                    device: torch.device, generator: torch.Generator | None = None,
                    drop_last: bool = False, on_step: Callable[[], None] | None = None,
                    bf16: bool | None = None, step: TrainStep | None = None) -> dict:
    """One pass over shuffled ``inputs``; returns ``{"loss", "accuracy", "samples"}``.

    Args:
        model: the module whose trainable parameters ``optimizer`` updates.
        inputs: uint8 images ``(N, H, W, 3)`` or features ``(N, F)``, on ``device`` or the host.
        labels: int64 class indices ``(N,)`` on ``device``.
        transform: raw batch on ``device`` -> model input (augmentation + normalisation).
        generator: CPU generator for the shuffle order (reproducible runs).
        drop_last: drop a trailing partial batch (static shapes for ``torch.compile`` and CUDA graphs).
        on_step: called after each step (progress bar); must not synchronise.
        bf16: bf16 autocast; None = :func:`~crystalscope.models.precision.use_bf16` (on CUDA only).
        step: what runs forward, backward and the update (e.g. a
            :class:`~crystalscope.training.steps.GraphedTrainStep` kept across epochs); default
            an eager :class:`~crystalscope.training.steps.TrainStep` on ``model``/``optimizer``.

    Example:
        >>> stats = train_one_epoch(model, x, y, opt, transform=f, batch_size=64,  # doctest: +SKIP
        ...                         device=torch.device("cpu"))
    """
    bf16 = use_bf16(device) if bf16 is None else bf16
    step = step or TrainStep(model, optimizer, device, bf16)
    step.reset()
    train_mode(model)
    n = inputs.shape[0]
    order = torch.randperm(n, generator=generator)  # CPU generator: the same order on any device
    # one copy of the order per epoch, so indexing device-resident data needs no per-step transfer
    order_on_device = order.to(device)
    seen = 0
    for rows in batches(n, batch_size, drop_last, min_rows=2):
        if rows.stop - rows.start < 2:
            continue  # only when the whole split is one image: refused before training starts
        index = order_on_device[rows]
        host_index = order[rows] if inputs.device != device else index
        x = model_input(transform(to_device(inputs, host_index, device)))
        y = labels[index]
        step(x, y)
        seen += y.shape[0]
        if on_step:
            on_step()
    if seen == 0:
        raise CrystalscopeError(f"no training step could run: {n} training images do not fill one batch of "
                                f"{batch_size}; lower --batch-size")
    return {"loss": float(step.loss_sum.item()) / seen, "accuracy": float(step.correct.item()) / seen,
            "samples": seen}


# no_grad, not inference_mode: a torch.compile'd model that alternates between training and
# inference-mode calls can break under CUDA graphs (pytorch/pytorch#135892)
@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None, *, transform: Transform,
             batch_size: int, device: torch.device, on_step: Callable[[], None] | None = None,
             bf16: bool | None = None) -> dict:
    """Logits for every input in order (eval mode, no augmentation), plus loss and accuracy.

    ``bf16`` as in :func:`train_one_epoch`.

    Returns:
        ``{"logits": float32 np.ndarray (N, C), "loss", "accuracy"}``; loss and accuracy are
        None when ``labels`` is None.
    """
    bf16 = use_bf16(device) if bf16 is None else bf16
    model.eval()
    chunks = []
    for rows in batches(inputs.shape[0], batch_size):
        x = model_input(transform(to_device(inputs, rows, device)))
        with autocast(device, bf16):
            # a copy: under CUDA graphs the next call overwrites the model's output buffer
            chunks.append(model(x).to(torch.float32, copy=True))
        if on_step:
            on_step()
    logits = torch.cat(chunks) if chunks else torch.zeros((0, 0), device=device)
    result = {"logits": logits.cpu().numpy().astype(np.float32), "loss": None, "accuracy": None}
    if labels is not None and len(chunks):
        y = labels.to(logits.device)
        result["loss"] = float(nn.functional.cross_entropy(logits, y).item())
        result["accuracy"] = float((logits.argmax(1) == y).float().mean().item())
    return result
