"""The train command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crystalscope.cli.common import app, fail, user_errors
from crystalscope.config import SECTION_OF, choices, defaults

# what a None default means, said in the help (the config's default is None for these)
NONE_MEANS = {"positive_class": "pg when present, else the last class", "workers": "the CPU count",
              "cache_dir": "$XDG_CACHE_HOME/crystalscope, or ~/.cache/crystalscope"}


def _option(name: str, *decls: str, help: str):
    """A ``train`` option for config key ``name``: choices and default read from the config.

    The option's value is None unless typed, so a ``--config`` YAML file is not overridden by
    a default; the help shows the config's default, so it cannot drift from it.
    """
    default = defaults()[name]
    if default is None:
        shown = NONE_MEANS.get(name, "none")
    else:
        shown = ("on" if default else "off") if isinstance(default, bool) else default
    allowed = choices(name)
    listed = f" One of: {', '.join(allowed)}." if allowed and name != "device" else ""
    return typer.Option(None, *decls, help=f"{help}{listed} (default: {shown})")


@app.command("train")
@user_errors
def train(
    data_dir: Optional[Path] = typer.Argument(None, help="Split folder with train/, val/ and test/ (class folders in each). Optional with --resume."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; options given here override it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/train, runs/train2, ...)."),
    backbone: Optional[str] = _option("backbone", help="Any timm model name, e.g. resnet18, resnet50, efficientnet_lite0."),
    weights: Optional[str] = _option("weights", help="Pretrained weights (none: random init)."),
    weights_file: Optional[Path] = typer.Option(None, help="Local timm/torchvision state dict for the backbone (instead of --weights)."),
    trainable_fraction: Optional[float] = _option("trainable_fraction", help="Last fraction of backbone layers to train: 0 frozen, 1 all."),
    lr: Optional[float] = _option("lr", help="SGD learning rate (momentum: the YAML key momentum)."),
    batch_size: Optional[int] = _option("batch_size", help="Images per step."),
    image_size: Optional[int] = _option("image_size", help="Square model input side in pixels."),
    resize: Optional[str] = _option("resize", help="stretch (distort to square) or pad (keep aspect, letterbox)."),
    epochs: Optional[int] = _option("epochs", help="Maximum number of epochs."),
    f1_threshold: Optional[float] = _option("f1_threshold", help="Stop when every class's val F1 reaches this."),
    f1_patience: Optional[int] = _option("f1_patience", help="Consecutive epochs every class must stay at --f1-threshold before stopping."),
    patience: Optional[int] = _option("patience", help="Stop when val loss has not improved for this many epochs."),
    positive_class: Optional[str] = _option("positive_class", help="Positive class of a binary task."),
    device: Optional[str] = _option("device", help="Where to train (or cuda:N); auto = cuda when a GPU is visible."),
    precision: Optional[str] = _option("precision", help="Precision of the training steps; auto = bf16 autocast on CUDA, fp32 on the CPU."),
    seed: Optional[int] = _option("seed", help="Random seed (model init, shuffling, augmentation)."),
    workers: Optional[int] = _option("workers", help="Image decoding threads."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run folder from its weights/last.ckpt."),
    compile: Optional[bool] = _option("compile", "--compile/--no-compile", help="torch.compile the model (pays off on a GPU)."),
    compile_mode: Optional[str] = _option("compile_mode", help="torch.compile mode (reduce-overhead = CUDA graphs: fastest at batch 64 on a GPU)."),
    cuda_graphs: Optional[bool] = _option("cuda_graphs", "--cuda-graphs/--no-cuda-graphs", help="CUDA only: record the training step once as a CUDA graph and replay it (no compile time; drops each epoch's last partial batch)."),
    cache_features: Optional[bool] = _option("cache_features", "--cache-features/--no-cache-features", help="Frozen backbone: compute its features once, train only the head (the fast CPU path; needs --trainable-fraction 0)."),
    cache_frozen: Optional[bool] = _option("cache_frozen", "--cache-frozen/--no-cache-frozen", help="Compute the frozen layers' output once and train only the trainable last layers (--trainable-fraction) + head on it."),
    feature_passes: Optional[int] = _option("feature_passes", help="With feature caching: passes over the training images, those after the first augmented."),
    cache_dir: Optional[str] = _option("cache_dir", help="Where decoded images are cached; 'off' disables."),
    onnx: Optional[bool] = _option("onnx", "--onnx/--no-onnx", help="Export model.onnx (checked against PyTorch)."),
    reject_fpr: Optional[float] = _option("reject_fpr", help="Fit the rejection of foreign images so this fraction of valid (val) crops is rejected; 0 turns it off."),
    nproc: Optional[int] = _option("nproc", "--nproc", help="Train with N processes (DistributedDataParallel, as torchrun --nproc-per-node N; gloo on CPU, NCCL on GPUs); --batch-size is per process; docs/scaling.md."),
    lr_scaling: Optional[str] = _option("lr_scaling", help="With several processes: none (keep --lr) or linear (--lr x processes, for the larger effective batch)."),
    sync_bn: Optional[bool] = _option("sync_bn", "--sync-bn/--no-sync-bn", help="With several GPU processes: synchronise BatchNorm statistics across them."),
):
    """Train a classifier on a split folder and write every deliverable into the run folder."""
    from crystalscope.config import load_config
    from crystalscope.training.run import config_for_resume, train as run_training

    typed = dict(locals())  # the options as typed: every config key the CLI has, by its own name
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in typed.items()
                 if k in SECTION_OF and k != "resume" and v is not None}
    if resume is not None:
        if config is not None:
            raise fail("--resume uses the run's own config.yaml; leave out --config")
        cfg = config_for_resume(resume, overrides)
    else:
        cfg = load_config(config, overrides)
    run_training(cfg)
