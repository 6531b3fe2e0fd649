"""The CPU path: with a frozen backbone, compute its features once and train only the head.

With ``--trainable-fraction 0`` the backbone's output for an image never changes during
training, so running the backbone every epoch (by far the dominant cost on a CPU; figures in
docs/benchmarks.md) is wasted work. ``--cache-features`` runs it once per
split and then trains the head on the feature tensors, which takes seconds per epoch. The
head and the backbone are then assembled into the usual full model, so checkpoints, reports
and the ONNX file are the same as for end-to-end training.

Augmentation: with ``feature_passes = 1`` (default) the training features come from the
un-augmented images only, the cheapest option and the one that keeps the CPU path within
minutes. ``feature_passes = k`` adds ``k - 1`` augmented passes over the training images
(random affine + flips, as in end-to-end training), multiplying the training set the head
sees by ``k`` at ``k`` times the feature cost.

``--cache-frozen`` generalises this to a partly trainable backbone (``--trainable-fraction``
> 0): :func:`split_for_caching` cuts the backbone where its first trainable layer starts; the
frozen prefix runs once per image (its output, e.g. 192 x 5 x 5 maps for efficientnet_lite0 at
160 px, is what gets cached) and the trainable tail plus the head are trained on those maps
every epoch. The tail's modules are the model's own, so the trained weights land in the full
model as usual. Frozen BatchNorm layers run in eval mode either way (see
:func:`crystalscope.training.loop.train_mode`), so the cached maps are exactly what the full
model computes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from crystalscope.data.augment import AugmentSpec, augment_batch
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.training.loop import batches, to_device
from crystalscope.models.precision import autocast, model_input, use_bf16
from crystalscope.runtime import ProgressCallback


def backbone_parts(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's children in definition order, ``nn.Sequential`` containers expanded.

    For timm ResNets and EfficientNets this is also the order of ``forward``;
    :func:`split_for_caching` checks that numerically before relying on it.

    Example:
        >>> from crystalscope.models.factory import create_backbone
        >>> len(backbone_parts(create_backbone("resnet18")))  # conv1 bn1 act1 maxpool 8 blocks pool fc
        14
    """
    parts: list[nn.Module] = []
    for child in backbone.children():
        parts += backbone_parts(child) if isinstance(child, nn.Sequential) else [child]
    return parts


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def split_for_caching(model: nn.Module, image_size: int) -> tuple[nn.Module, nn.Module]:
    """``(frozen_prefix, trained)``: what runs once per image and what trains every epoch.

    With a fully frozen backbone: ``(model.backbone, model.head)``, the plain feature cache.
    Otherwise the backbone is cut before the first part that holds a trainable parameter;
    ``trained`` is that tail followed by the head (sharing the model's modules).

    Raises:
        CrystalscopeError: the whole backbone is trainable (nothing to cache), or the
            backbone's forward is not the plain chain of its parts (e.g. a transformer).

    Example:
        >>> from crystalscope.models.factory import build_model, set_trainable_fraction
        >>> model = build_model("resnet18", 2)
        >>> _ = set_trainable_fraction(model.backbone, 0.1)
        >>> prefix, trained = split_for_caching(model, 64)
        >>> prefix(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 512, 2, 2])
    """
    backbone = model.backbone
    if not _trainable(backbone):
        return backbone, model.head
    parts = backbone_parts(backbone)
    cut = next(i for i, part in enumerate(parts) if _trainable(part))
    if cut == 0:
        raise CrystalscopeError("--cache-frozen: every backbone layer is trainable, so nothing can be cached; "
                                "lower --trainable-fraction")
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        x = x.to(next(backbone.parameters()).device)
        same = torch.allclose(backbone(x), nn.Sequential(*parts)(x), rtol=1e-4, atol=1e-4)
    backbone.train(was_training)
    if not same:
        raise CrystalscopeError("--cache-frozen: this backbone's forward is not a plain chain of its layers; "
                                "use --trainable-fraction 0 --cache-features or train without caching")
    return nn.Sequential(*parts[:cut]), nn.Sequential(*parts[cut:], model.head)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (None when the system does not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def check_feature_memory(extractor: nn.Module, image_size: int, rows: dict[str, int], device: torch.device,
                         option: str = "--cache-frozen") -> int:
    """Fail early, with a way out, when the feature cache would not fit in memory.

    The cache holds float32 outputs of ``extractor`` for ``rows[split]`` images per split
    (the train split counted once per feature pass); while the train split's passes are
    concatenated they exist twice. An out-of-memory kill after minutes of feature
    extraction would lose the run, so this runs before any image is decoded.

    Returns:
        the estimated peak bytes.

    Raises:
        CrystalscopeError: the estimate exceeds 80 % of :func:`available_memory`.

    Example:
        >>> check_feature_memory(prefix, 160, {"train": 19130, "val": 3417, "test": 682},  # doctest: +SKIP
        ...                      torch.device("cpu"))
        441200000
    """
    was_training = extractor.training
    extractor.eval()
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=next(extractor.parameters()).device)
        per_image = extractor(probe)[0]
    extractor.train(was_training)
    image_bytes = per_image.numel() * 4
    peak = image_bytes * (sum(rows.values()) + rows.get("train", 0))
    free = available_memory(device)
    if free is not None and peak > 0.8 * free:
        shape = " x ".join(str(d) for d in per_image.shape)
        raise CrystalscopeError(
            f"{option}: the cached features ({shape} floats per image, {sum(rows.values()):,} images) need about "
            f"{_size(peak)} but only {_size(free)} of {device.type} memory is free; use a smaller "
            "--image-size, fewer --feature-passes, a lower --trainable-fraction (the cut moves later), or no caching")
    return peak


@torch.inference_mode()
def backbone_features(backbone: nn.Module, images: torch.Tensor, preprocessing: Preprocessing, *,
                      batch_size: int, device: torch.device, augment: AugmentSpec | None = None,
                      generator: torch.Generator | None = None, on_step=None,
                      bf16: bool | None = None) -> torch.Tensor:
    """Backbone outputs ``float32`` on ``device`` for uint8 images ``(N, H, W, 3)``.

    Pooled features ``(N, F)`` for a whole backbone, feature maps ``(N, C, h, w)`` for the
    frozen prefix of :func:`split_for_caching`.

    Example:
        >>> feats = backbone_features(model.backbone, x_uint8, pre, batch_size=64,  # doctest: +SKIP
        ...                           device=torch.device("cpu"))
    """
    bf16 = use_bf16(device) if bf16 is None else bf16
    backbone.eval()
    chunks = []
    for rows in batches(images.shape[0], batch_size):
        batch = to_device(images, rows, device)
        x = (augment_batch(batch, preprocessing, augment, generator=generator) if augment
             else preprocessing.normalize_torch(batch))
        x = model_input(x)
        with autocast(device, bf16):
            chunks.append(backbone(x).float())
        if on_step:
            on_step()
    return torch.cat(chunks)


def split_features(backbone: nn.Module, images: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                   preprocessing: Preprocessing, *, batch_size: int, device: torch.device,
                   augment: AugmentSpec, passes: int = 1, generator: torch.Generator | None = None,
                   on_progress: ProgressCallback | None = None,
                   bf16: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features of every split; the train split gets ``passes - 1`` extra augmented passes.

    ``on_progress(done, total)`` is called after every batch (``done`` counts batches over
    all splits and passes).

    Returns:
        ``(features, labels)`` dicts keyed by split name; train labels repeated per pass.

    Example:
        >>> feats, labels = split_features(model.backbone, images, labels, pre, batch_size=64,  # doctest: +SKIP
        ...                                device=torch.device("cpu"), augment=AugmentSpec())
    """
    features, feature_labels = {}, {}
    total = sum((passes if split == "train" else 1) * -(-x.shape[0] // batch_size) for split, x in images.items())
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    for split, x in images.items():
        n_passes = passes if split == "train" else 1
        parts = [backbone_features(backbone, x, preprocessing, batch_size=batch_size, device=device,
                                   augment=augment if k > 0 else None, generator=generator, on_step=step,
                                   bf16=bf16)
                 for k in range(n_passes)]
        features[split] = torch.cat(parts)
        feature_labels[split] = labels[split].repeat(n_passes)
    return features, feature_labels
