"""What a training run builds once, before its first epoch, as small explicit parts.

:func:`index_data` (the split folders, the classes) -> :func:`build_learner` (the model with
its weights, the optimiser, the training step, and the resumable :class:`TrainState`) ->
:func:`load_data` (each split decoded once into uint8 tensors) -> :func:`cache_features`
(optional: the frozen part's output replaces the images). Each returns its part; nothing is
filled in later by someone else, and :func:`crystalscope.training.run.train` passes the parts
to the epoch steps explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from crystalscope.config import TrainConfig
from crystalscope.data.augment import AugmentSpec, augment_batch
from crystalscope.data.dataset import ImageFolder, index_split, load_images
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import SPLITS
from crystalscope.models.factory import (CrystalClassifier, HeadSpec, build_model, default_preprocessing,
                                         set_trainable_fraction)
from crystalscope.models.precision import place_model, use_bf16
from crystalscope.runtime import progress_bar
from crystalscope.training import distributed
from crystalscope.training.distributed import World
from crystalscope.training.record import weights_hash
from crystalscope.training.steps import GraphedTrainStep, TrainStep
from crystalscope.training.stopping import StoppingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """The splits and the tensors the epochs run on (this process's shard of each split).

    ``inputs`` are uint8 images ``(N, H, W, 3)``, or with feature caching the frozen part's
    float32 output; ``splits`` always describe the whole splits (every process).
    """

    splits: dict[str, ImageFolder]
    class_names: list[str]
    positive_class: str | None
    preprocessing: Preprocessing
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    shard_index: dict[str, np.ndarray] = field(default_factory=dict)  # rows of each split held here
    image_stats: dict[str, np.ndarray] = field(default_factory=dict)  # per split, for the rejection fit


@dataclass(frozen=True)
class Learner:
    """The model being trained and what updates it: the one handle every step receives.

    ``model`` is the whole classifier (checkpoints, the final report). With feature caching the
    epochs run only ``trained`` (the head, or the trainable backbone tail + head) on the cached
    output of ``prefix``; otherwise ``trained`` is ``model``. ``forward`` is ``trained`` as the
    training step calls it (a DDP replica with several processes, torch.compile'd with
    ``--compile``).
    """

    model: CrystalClassifier
    head: HeadSpec
    trained: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    world: World
    bf16: bool = False  # bf16 autocast for the training steps (``precision``; CUDA by default)
    prefix: torch.nn.Module | None = None  # the cached (frozen) part, with feature caching
    step: TrainStep | None = None  # kept across epochs (a captured CUDA graph); None = eager


@dataclass
class TrainState:
    """What changes from epoch to epoch and travels in ``last.ckpt`` for ``--resume``."""

    stopping: StoppingState
    shuffle_rng: torch.Generator
    augment_rng: torch.Generator
    epoch: int = 0  # epochs completed
    weights_source: str = ""
    initial_weights: str = ""  # content hash of the weights training started from
    resume_rng: dict | None = None  # global RNG states to restore when the resumed epochs start


def index_data(cfg: TrainConfig, last: dict | None) -> RunData:
    """The split folders, their classes and the model's preprocessing (nothing decoded yet)."""
    from crystalscope.evaluation.report import resolve_positive_class

    splits = index_split(cfg.data_dir)
    class_names = splits["train"].class_names
    if last is not None and list(last["class_names"]) != class_names:
        raise CrystalscopeError(f"--resume {cfg.resume}: the data's classes ({', '.join(class_names)}) differ "
                                f"from the run's ({', '.join(last['class_names'])})")
    positive = resolve_positive_class(class_names, cfg.positive_class.lower() if cfg.positive_class else None)
    m = cfg.model
    return RunData(splits=splits, class_names=class_names, positive_class=positive,
                   preprocessing=default_preprocessing(m.backbone, m.image_size, m.resize))


def _weights(model: CrystalClassifier, cfg: TrainConfig, last: dict | None) -> tuple[str, str]:
    """Pretrained (or resumed) weights into ``model``; returns (source, initial weights hash)."""
    from crystalscope.models.weights import load_pretrained

    if last is None:
        source = load_pretrained(model.backbone, cfg.model.backbone, cfg.model.weights, cfg.model.weights_file)
        return source, weights_hash(model)
    model.load_state_dict(last["model_state"])
    return last["training"].get("weights_source") or "unknown", last["training"].get("initial_weights_sha256", "")


def build_learner(cfg: TrainConfig, data: RunData, device: torch.device, world: World,
                  last: dict | None) -> tuple[Learner, TrainState]:
    """Model with pretrained (or resumed) weights, trainable fraction, optimiser, training state."""
    torch.manual_seed(cfg.seed)  # the model's random init
    head = HeadSpec(hidden=list(cfg.model.head_hidden), dropout=list(cfg.model.head_dropout))
    model = build_model(cfg.model.backbone, len(data.class_names), head)
    source, initial = _weights(model, cfg, last)
    n_train, n_total = set_trainable_fraction(model.backbone, cfg.model.trainable_fraction)
    place_model(model, device)
    prefix, trained = None, model
    if cfg.caches_features:
        from crystalscope.training.features import split_for_caching

        prefix, trained = split_for_caching(model, cfg.model.image_size)
    lr = distributed.scaled_lr(cfg.optimiser.lr, cfg.optimiser.lr_scaling, world)
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=lr,
                                momentum=cfg.optimiser.momentum)
    state = TrainState(stopping=StoppingState(**cfg.stopping.model_dump()),
                       shuffle_rng=torch.Generator().manual_seed(cfg.seed),
                       augment_rng=torch.Generator(device=device).manual_seed(cfg.seed + 1),
                       weights_source=source, initial_weights=initial)
    if last is not None:
        _resume(last, optimizer, state, lr, keep_augment=not cfg.caches_features)
    # distributed hook: a DDP replica with several processes, `trained` itself with one
    replica = distributed.wrap_model(trained, world, device, cfg.runtime.sync_bn)
    bf16 = use_bf16(device, cfg.runtime.precision)
    learner = Learner(model=model, head=head, trained=trained, optimizer=optimizer, device=device, world=world,
                      bf16=bf16, prefix=prefix,
                      forward=torch.compile(replica, mode=cfg.runtime.compile_mode) if cfg.runtime.compile else replica,
                      step=GraphedTrainStep(trained, optimizer, device, bf16) if cfg.runtime.cuda_graphs else None)
    if world.is_main:
        log.info(_describe(cfg, learner, state, data, lr, (n_train, n_total)))
    return learner, state


def _resume(last: dict, optimizer: torch.optim.Optimizer, state: TrainState, lr: float, keep_augment: bool) -> None:
    """Continue where ``last.ckpt`` stopped: optimiser, stopping counters, epoch, random streams."""
    saved = last["training"]
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr  # the rule for this run's number of processes, which may differ from the saved one
    state.stopping = StoppingState.from_dict(saved["stopping"])
    state.epoch = int(saved["epoch"])
    state.shuffle_rng.set_state(saved["shuffle_rng"])
    if keep_augment:
        # with feature caching the augment stream is only used to build the cached features,
        # which a resumed run rebuilds from the start: keep it freshly seeded
        state.augment_rng.set_state(saved["augment_rng"])
    state.resume_rng = saved.get("rng")


def _describe(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, lr: float,
              layers: tuple[int, int]) -> str:
    """The line that says what is trained, on what, how."""
    r, world, batch = cfg.runtime, learner.world, cfg.optimiser.batch_size
    return (f"{cfg.model.backbone}: weights {state.weights_source}; {layers[0]}/{layers[1]} backbone layers "
            f"trainable; {len(data.class_names)} classes ({', '.join(data.class_names)}); device {learner.device}"
            + (" (bf16 autocast)" if learner.bf16 else "")
            + (f"; torch.compile mode {r.compile_mode}" if r.compile else "")
            + ("; CUDA graph training step" if r.cuda_graphs else "")
            + (f"; {world.size} processes: effective batch {batch * world.size} ({batch} per process), "
               f"lr {lr:g} (--lr-scaling {cfg.optimiser.lr_scaling})"
               + (", synchronised BatchNorm" if r.sync_bn else "") if world.enabled else ""))


def check_cache_memory(cfg: TrainConfig, learner: Learner, data: RunData) -> None:
    """With feature caching: fail before decoding when the cache would not fit in memory."""
    from crystalscope.training.features import check_feature_memory

    passes = cfg.runtime.feature_passes
    rows = {s: len(f) * (passes if s == "train" else 1) for s, f in data.splits.items()}
    check_feature_memory(learner.prefix, cfg.model.image_size, rows, learner.device,
                         "--cache-features" if cfg.runtime.cache_features else "--cache-frozen")


def _place(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images on the GPU when they fit comfortably, else pinned host memory (CUDA)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    return tensor.to(device) if tensor.nbytes < 0.25 * free else tensor.pin_memory()


def load_images_of(cfg: TrainConfig, splits: dict[str, ImageFolder], preprocessing: Preprocessing,
                   device: torch.device, progress: bool) -> tuple[dict, dict]:
    """Decode each split once (or read the on-disk cache); returns (images, labels) tensors."""
    images, labels = {}, {}
    for split in SPLITS:
        folder = splits[split]
        array = load_images(folder.paths, preprocessing, workers=cfg.runtime.workers, cache_dir=cfg.runtime.cache_dir,
                            description=f"decoding {split}", progress=progress)
        images[split] = _place(array, device)
        labels[split] = torch.from_numpy(folder.labels).to(device)
    return images, labels


def split_image_statistics(images: torch.Tensor, preprocessing: Preprocessing, chunk: int = 256) -> np.ndarray:
    """The image statistics of uint8 ``(N, H, W, 3)`` images, in chunks, by the module the
    exported graph runs (:class:`~crystalscope.models.rejection.ImageStatistics` on the
    normalised input), so the rejection is fitted on the numbers it will score."""
    from crystalscope.models.rejection import N_STATISTICS, ImageStatistics

    module = ImageStatistics(preprocessing.image_size, preprocessing.mean, preprocessing.std).to(images.device)
    with torch.inference_mode():
        parts = [module(preprocessing.normalize_torch(images[i:i + chunk])).double().cpu().numpy()
                 for i in range(0, images.shape[0], chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, N_STATISTICS))


def load_data(cfg: TrainConfig, data: RunData, device: torch.device, world: World, progress: bool) -> RunData:
    """``data`` with this process's shard of every split decoded (and the image statistics)."""
    # distributed hook: each rank decodes (and caches) only its shard of every split
    shard_index = {s: distributed.shard_indices(len(f), world, pad=(s == "train")) for s, f in data.splits.items()}
    local = ({s: distributed.shard_folder(f, shard_index[s]) for s, f in data.splits.items()}
             if world.enabled else data.splits)
    images, labels = load_images_of(cfg, local, data.preprocessing, device, progress)
    stats = {}
    if cfg.reject_fpr > 0 and not world.enabled:  # from the images, before feature caching replaces them
        stats = {s: split_image_statistics(images[s], data.preprocessing) for s in SPLITS}
    return dataclasses.replace(data, inputs=images, labels=labels, shard_index=shard_index, image_stats=stats)


def augment_spec(cfg: TrainConfig) -> AugmentSpec:
    """The training augmentation of ``cfg`` (its ``augmentation`` section)."""
    return AugmentSpec(**cfg.augmentation.model_dump())


def cache_features(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, progress: bool) -> RunData:
    """``data`` with the images replaced by the frozen part's output (feature caching)."""
    from crystalscope.training.features import split_features
    from crystalscope.training.onnx_prefix import choose_prefix

    check = data.preprocessing.normalize_torch(data.inputs["train"][:16].to(learner.device))
    runner, line = choose_prefix(learner.prefix, check, cfg.runtime.prefix_runtime, learner.device, learner.bf16)
    if learner.world.is_main:
        log.info(line)
    started = time.perf_counter()
    batch, passes = cfg.optimiser.batch_size, cfg.runtime.feature_passes
    with progress_bar("features", enabled=progress) as advance:
        feats, labels = split_features(runner, data.inputs, data.labels, data.preprocessing, batch_size=batch,
                                       device=learner.device, augment=augment_spec(cfg), passes=passes,
                                       generator=state.augment_rng, on_progress=advance, bf16=learner.bf16)
    if learner.world.is_main:
        shape = "x".join(str(d) for d in feats["train"].shape[1:])
        log.info(f"backbone features cached in {time.perf_counter() - started:.1f} s ({shape} per image)")
    return dataclasses.replace(data, inputs=feats, labels=labels)


def transforms(cfg: TrainConfig, data: RunData, state: TrainState) -> tuple[Callable, Callable]:
    """(train transform, eval transform) from a raw batch on the device to model input."""
    if cfg.caches_features:
        return (lambda x: x), (lambda x: x)
    pre, spec = data.preprocessing, augment_spec(cfg)
    return ((lambda x: augment_batch(x, pre, spec, generator=state.augment_rng)), pre.normalize_torch)

