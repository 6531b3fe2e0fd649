"""The CPU path: with a frozen backbone, compute its features once and train only the head.

With ``--trainable-fraction 0`` the backbone's output for an image never changes during
training, so running the backbone every epoch (by far the dominant cost: ~60 img/s for
efficientnet_lite0 on a 2-core CPU) is wasted work. ``--cache-features`` runs it once per
split and then trains the head on the feature tensors, which takes seconds per epoch. The
head and the backbone are then assembled into the usual full model, so checkpoints, reports
and the ONNX file are the same as for end-to-end training.

Augmentation: with ``feature_passes = 1`` (default) the training features come from the
un-augmented images only, the cheapest option and the one that keeps the CPU path within
minutes. ``feature_passes = k`` adds ``k - 1`` augmented passes over the training images
(random affine + flips, as in end-to-end training), multiplying the training set the head
sees by ``k`` at ``k`` times the feature cost.
"""

from __future__ import annotations

import torch
from torch import nn

from crystalscope.data.augment import AugmentSpec, augment_batch, normalize_on_device
from crystalscope.data.transforms import Preprocessing
from crystalscope.training.loop import _autocast, _batches, _to_device


@torch.inference_mode()
def backbone_features(backbone: nn.Module, images: torch.Tensor, preprocessing: Preprocessing, *,
                      batch_size: int, device: torch.device, augment: AugmentSpec | None = None,
                      generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """Pooled backbone features ``float32 (N, F)`` on ``device`` for uint8 images ``(N, H, W, 3)``.

    Example:
        >>> feats = backbone_features(model.backbone, x_uint8, pre, batch_size=64,  # doctest: +SKIP
        ...                           device=torch.device("cpu"))
    """
    backbone.eval()
    chunks = []
    for rows in _batches(images.shape[0], batch_size):
        batch = _to_device(images, rows, device)
        x = (augment_batch(batch, preprocessing, augment, generator=generator) if augment
             else normalize_on_device(batch, preprocessing))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            chunks.append(backbone(x).float())
        if on_step:
            on_step()
    return torch.cat(chunks)


def split_features(backbone: nn.Module, images: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                   preprocessing: Preprocessing, *, batch_size: int, device: torch.device,
                   augment: AugmentSpec, passes: int = 1, generator: torch.Generator | None = None,
                   progress=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features of every split; the train split gets ``passes - 1`` extra augmented passes.

    Returns:
        ``(features, labels)`` dicts keyed by split name; train labels repeated per pass.
    """
    features, feature_labels = {}, {}
    for split, x in images.items():
        n_passes = passes if split == "train" else 1
        task = progress.add_task(f"features {split}", total=n_passes * -(-x.shape[0] // batch_size)) if progress else None
        step = (lambda: progress.advance(task)) if progress else None
        parts = [backbone_features(backbone, x, preprocessing, batch_size=batch_size, device=device,
                                   augment=augment if k > 0 else None, generator=generator, on_step=step)
                 for k in range(n_passes)]
        features[split] = torch.cat(parts)
        feature_labels[split] = labels[split].repeat(n_passes)
    return features, feature_labels
