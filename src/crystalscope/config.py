"""The training configuration: one typed dataclass, loaded from YAML plus CLI overrides.

Precedence (lowest to highest): the dataclass defaults (the reference recipe), the YAML file
given with ``--config``, the options the user actually typed on the command line. Unknown keys
are an error, so a typo like ``learning_rate:`` never silently trains with the default. The
resolved config is saved as ``config.yaml`` in the run folder, which is also what
``--resume`` reads back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crystalscope.errors import CrystalscopeError
from crystalscope.io import write_text


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults reproduce the reference study.

    Example:
        >>> cfg = TrainConfig(data_dir="split", backbone="resnet18", epochs=2)
        >>> cfg.lr, cfg.batch_size, cfg.trainable_fraction
        (0.1, 64, 0.1)
    """

    data_dir: str | None = None
    out: str | None = None  # None: runs/train, runs/train2, ... (never overwrites a run)
    # model
    backbone: str = "resnet101"
    weights: str = "imagenet"  # imagenet | none
    weights_file: str | None = None
    trainable_fraction: float = 0.1
    head_hidden: list[int] = field(default_factory=lambda: [512, 256])
    head_dropout: list[float] = field(default_factory=lambda: [0.4, 0.3])
    # optimisation (SGD with momentum, constant learning rate, as the reference)
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 100
    # input
    image_size: int = 224
    resize: str = "stretch"  # stretch | pad
    # training augmentation (Keras ImageDataGenerator semantics)
    rotation: float = 30.0  # degrees, uniform in +-rotation
    shift: float = 0.2  # fraction of the side, uniform in +-shift
    zoom: float = 0.3  # scale uniform in 1 +- zoom
    hflip: bool = True
    vflip: bool = True
    # stopping
    f1_threshold: float = 0.997
    f1_patience: int = 1
    patience: int = 10
    # classes
    positive_class: str | None = None  # default: pg when present, else the last class (binary)
    # machinery
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 0
    workers: int | None = None  # image decoding threads; None = CPU count
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    cuda_graphs: bool = False  # capture the eager training step as a CUDA graph (CUDA only, no compile time)
    cache_dir: str | None = None  # None = $XDG_CACHE_HOME/crystalscope; "off" = no disk cache
    cache_features: bool = False
    feature_passes: int = 1  # train feature passes with --cache-features; passes after the first are augmented
    cache_frozen: bool = False  # cache the frozen layers' output; train the trainable tail + head on it
    prefix_runtime: str = "auto"  # what runs the cached frozen part: auto (ONNX Runtime on the CPU if it matches) | onnxruntime | torch
    onnx: bool = True
    # rejection of foreign images: fraction of in-distribution (val) images the threshold
    # rejects; 0 = no rejection fit (docs/ood.md)
    reject_fpr: float = 0.01
    resume: str | None = None
    # several processes (torchrun / --nproc; training/distributed.py, docs/scaling.md): batch_size is
    # per process, so the effective batch is batch_size x nproc; lr_scaling "linear" multiplies lr by
    # nproc for that larger batch, "none" keeps lr as given
    nproc: int = 1
    lr_scaling: str = "none"  # none | linear
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes (GPUs only)

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; raise a one-line error naming the option."""
        def bad(option: str, why: str):
            raise CrystalscopeError(f"--{option.replace('_', '-')}: {why}")

        if self.weights not in ("imagenet", "none"):
            bad("weights", f"{self.weights!r} is not known; use imagenet or none (or --weights-file PATH)")
        if self.resize not in ("stretch", "pad"):
            bad("resize", f"{self.resize!r} is not known; use stretch or pad")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", f"{self.device!r} is not known; use auto, cpu or cuda")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", f"{self.precision!r} is not known; use auto, fp32 or bf16")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            bad("compile_mode", f"{self.compile_mode!r} is not a torch.compile mode; use default, "
                "reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
        if self.cuda_graphs and self.compile:
            bad("cuda_graphs", "and --compile both replace the training step; choose one "
                "(--compile --compile-mode reduce-overhead also uses CUDA graphs)")
        for name in ("lr", "momentum", "trainable_fraction", "f1_threshold", "rotation", "shift", "zoom"):
            if not math.isfinite(float(getattr(self, name))):
                bad(name, f"{getattr(self, name)} is not a finite number")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", f"{self.momentum} must be in [0, 1)")
        if not 0.0 <= self.trainable_fraction <= 1.0:
            bad("trainable_fraction", f"{self.trainable_fraction} must be between 0 and 1")
        if self.lr_scaling not in ("none", "linear"):
            bad("lr_scaling", f"{self.lr_scaling!r} is not known; use none (keep --lr) or linear (--lr x --nproc)")
        if self.nproc > 1 and self.cuda_graphs:
            bad("cuda_graphs", "runs in one process; leave it out with --nproc (or torchrun)")
        for name in ("batch_size", "epochs", "image_size", "f1_patience", "patience", "feature_passes", "nproc"):
            if int(getattr(self, name)) < 1:
                bad(name, f"{getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            bad("lr", f"{self.lr} must be positive")
        if int(self.batch_size) < 2:
            # BatchNorm cannot normalise one image: every step would be skipped and nothing learnt
            bad("batch_size", f"{self.batch_size} is too small: BatchNorm needs at least 2 images per step")
        if self.prefix_runtime not in ("auto", "onnxruntime", "torch"):
            bad("prefix_runtime", f"{self.prefix_runtime!r} is not one of auto, onnxruntime, torch")
        if self.workers is not None and self.workers < 1:
            bad("workers", f"{self.workers} must be at least 1")
        if self.cache_features and self.trainable_fraction != 0:
            bad("cache_features", "needs a frozen backbone; add --trainable-fraction 0 (or use --cache-frozen "
                "to cache only the frozen layers and train the rest)")
        if not 0.0 <= self.reject_fpr < 0.5:
            bad("reject_fpr", f"{self.reject_fpr} must be in [0, 0.5): e.g. 0.01 rejects 1 % of valid crops, "
                "0 turns rejection off")
        if len(self.head_hidden) != len(self.head_dropout):
            bad("head_dropout", "needs one value per head_hidden layer")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(cfg_field: dataclasses.Field, value, source: str):
    """Turn YAML values into the field's type (``lr: 1e-2`` is a str in YAML 1.1)."""
    default = cfg_field.default if cfg_field.default is not dataclasses.MISSING else None
    kind = type(default) if default is not None else None
    if value is None or kind is None or isinstance(default, list):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[value.lower()]
            return bool(value)
        return kind(value)
    except (KeyError, TypeError, ValueError):
        raise CrystalscopeError(f"{source}: {cfg_field.name}={value!r} is not a valid {kind.__name__}") from None


def _apply(base: dict, updates: dict, source: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    merged = dict(base)
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CrystalscopeError(f"{source}: unknown key {key!r}{hint}")
        merged[name] = _coerce(fields[name], value, source)
    return merged


def load_config(yaml_path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (only values that are not None).

    Raises:
        CrystalscopeError: missing/invalid YAML, an unknown key, or an invalid value.

    Example:
        >>> load_config(None, {"backbone": "resnet18", "lr": None}).backbone
        'resnet18'
    """
    values = TrainConfig().to_dict()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise CrystalscopeError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise CrystalscopeError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise CrystalscopeError(f"--config {path}: expected a mapping of option: value")
        values = _apply(values, loaded, f"--config {path}")
    values = _apply(values, {k: v for k, v in (overrides or {}).items() if v is not None}, "option")
    return TrainConfig(**values).validate()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); :func:`load_config` reads it back."""
    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
