"""The train command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from crystalscope.cli.common import app, fail, user_errors


@app.command("train")
@user_errors
def train(
    data_dir: Optional[Path] = typer.Argument(None, help="Split folder with train/, val/ and test/ (class folders in each). Optional with --resume."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; options given here override it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/train, runs/train2, ...)."),
    backbone: Optional[str] = typer.Option(None, help="Any timm model name, e.g. resnet18, resnet50, efficientnet_lite0 (default: resnet101)."),
    weights: Optional[str] = typer.Option(None, help="Pretrained weights: imagenet or none (default: imagenet)."),
    weights_file: Optional[Path] = typer.Option(None, help="Local timm/torchvision state dict for the backbone (instead of --weights)."),
    trainable_fraction: Optional[float] = typer.Option(None, help="Last fraction of backbone layers to train: 0 frozen, 1 all (default: 0.1)."),
    lr: Optional[float] = typer.Option(None, help="SGD learning rate (momentum 0.9) (default: 0.1)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default: 64)."),
    image_size: Optional[int] = typer.Option(None, help="Square model input side in pixels (default: 224)."),
    resize: Optional[str] = typer.Option(None, help="stretch (distort to square) or pad (keep aspect, letterbox) (default: stretch)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum number of epochs (default: 100)."),
    f1_threshold: Optional[float] = typer.Option(None, help="Stop when every class's val F1 reaches this (default: 0.997)."),
    f1_patience: Optional[int] = typer.Option(None, help="Consecutive epochs every class must stay at --f1-threshold before stopping (default: 1)."),
    patience: Optional[int] = typer.Option(None, help="Stop when val loss has not improved for this many epochs (default: 10)."),
    positive_class: Optional[str] = typer.Option(None, help="Positive class of a binary task (default: pg when present, else the last class)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: auto)."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (default: auto)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (model init, shuffling, augmentation) (default: 0)."),
    workers: Optional[int] = typer.Option(None, help="Image decoding threads (default: CPU count)."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run folder from its weights/last.ckpt."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (pays off on a GPU) (default: off)."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode: default, reduce-overhead (CUDA graphs: fastest at batch 64 on a GPU) or max-autotune (default: default)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="CUDA only: record the training step once as a CUDA graph and replay it (no compile time; drops each epoch's last partial batch) (default: off)."),
    cache_features: Optional[bool] = typer.Option(None, "--cache-features/--no-cache-features", help="Frozen backbone: compute its features once, train only the head (the fast CPU path; needs --trainable-fraction 0)."),
    cache_frozen: Optional[bool] = typer.Option(None, "--cache-frozen/--no-cache-frozen", help="Compute the frozen layers' output once and train only the trainable last layers (--trainable-fraction) + head on it (default: off)."),
    feature_passes: Optional[int] = typer.Option(None, help="With feature caching: passes over the training images, those after the first augmented (default: 1)."),
    cache_dir: Optional[str] = typer.Option(None, help="Where decoded images are cached; 'off' disables (default: ~/.cache/crystalscope)."),
    onnx: Optional[bool] = typer.Option(None, "--onnx/--no-onnx", help="Export model.onnx (checked against PyTorch) (default: on)."),
    reject_fpr: Optional[float] = typer.Option(None, help="Fit the rejection of foreign images so this fraction of valid (val) crops is rejected; 0 turns it off (default: 0.01)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train with N processes (DistributedDataParallel, as torchrun --nproc-per-node N; gloo on CPU, NCCL on GPUs); --batch-size is per process (default: 1). docs/scaling.md."),
    lr_scaling: Optional[str] = typer.Option(None, help="With several processes: none (keep --lr) or linear (--lr x processes, for the larger effective batch) (default: none)."),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="With several GPU processes: synchronise BatchNorm statistics across them (default: off)."),
):
    """Train a classifier on a split folder and write every deliverable into the run folder."""
    from crystalscope.config import load_config
    from crystalscope.training.run import config_for_resume, train as run_training

    overrides = {k: v for k, v in dict(
        data_dir=str(data_dir) if data_dir else None, out=str(out) if out else None, backbone=backbone,
        weights=weights, weights_file=str(weights_file) if weights_file else None,
        trainable_fraction=trainable_fraction, lr=lr, batch_size=batch_size, image_size=image_size,
        resize=resize, epochs=epochs, f1_threshold=f1_threshold, f1_patience=f1_patience, patience=patience,
        positive_class=positive_class, device=device, precision=precision, seed=seed, workers=workers,
        compile=compile, compile_mode=compile_mode, cuda_graphs=cuda_graphs,
        cache_features=cache_features, cache_frozen=cache_frozen, feature_passes=feature_passes,
        cache_dir=cache_dir, onnx=onnx, reject_fpr=reject_fpr, nproc=nproc, lr_scaling=lr_scaling,
        sync_bn=sync_bn).items() if v is not None}
    if resume is not None:
        if config is not None:
            raise fail("--resume uses the run's own config.yaml; leave out --config")
        cfg = config_for_resume(resume, overrides)
    else:
        cfg = load_config(config, overrides)
    run_training(cfg, progress=sys.stderr.isatty())
