"""The training configuration: typed sections, loaded from YAML plus CLI overrides.

Precedence (lowest to highest): the defaults below (the reference recipe), the YAML file
given with ``--config``, the options the user actually typed on the command line. Every value
is type-checked (pydantic) and an invalid one is a one-line error naming the key and the value;
unknown keys are an error, so a typo like ``learning_rate:`` never silently trains with the
default. The resolved config is saved as ``config.yaml`` in the run folder (in sections), which
is also what ``--resume`` reads back.

Keys are flat everywhere a user types them (``lr: 0.01`` in YAML, ``--lr 0.01``, ``--set
lr=0.01`` in the benchmarks): each flat key belongs to exactly one section (:data:`SECTION_OF`).
A YAML file may also be written in sections (``optimiser: {lr: 0.01}``), as ``config.yaml`` is.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crystalscope.errors import CrystalscopeError
from crystalscope.io import write_text

# the choices, named once: the config checks them, the CLI's help lists them
Weights = Literal["imagenet", "none"]
Resize = Literal["stretch", "pad"]
Precision = Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast on CUDA, fp32 on the CPU
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
LrScaling = Literal["none", "linear"]
PrefixRuntime = Literal["auto", "onnxruntime", "torch"]
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N


class _Section(BaseModel):
    # lax types (YAML 1.1 reads ``1e-2`` as a string, ``--set`` gives YAML scalars), no extra keys;
    # numbers are not silently turned into strings except where a name may look like one
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelConfig(_Section):
    """What is trained: the backbone, its pretrained weights, the head and the input."""

    backbone: str = "resnet101"
    weights: Weights = "imagenet"
    weights_file: str | None = None
    trainable_fraction: float = 0.1  # last fraction of backbone layers trained: 0 frozen, 1 all
    head_hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [512, 256])  # widths
    head_dropout: list[Annotated[float, Field(ge=0, lt=1)]] = Field(default_factory=lambda: [0.4, 0.3])
    image_size: int = 224
    resize: Resize = "stretch"


class OptimiserConfig(_Section):
    """SGD with momentum at a constant learning rate, as the reference."""

    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64  # per process
    epochs: int = 100
    # several processes: "linear" multiplies lr by nproc for the nproc-times larger batch
    lr_scaling: LrScaling = "none"


class AugmentationConfig(_Section):
    """Training augmentation (Keras ImageDataGenerator semantics); fields of ``AugmentSpec``."""

    rotation: float = Field(30.0, ge=0, le=180)  # degrees, uniform in +-rotation
    shift: float = Field(0.2, ge=0, lt=1)  # fraction of the side, uniform in +-shift
    zoom: float = Field(0.3, ge=0, lt=1)  # scale uniform in 1 +- zoom (1 would reach scale 0)
    hflip: bool = True
    vflip: bool = True


class StoppingConfig(_Section):
    """The two stopping rules; fields of ``StoppingState``."""

    f1_threshold: float = 0.997
    f1_patience: int = 1
    patience: int = 10


class RuntimeConfig(_Section):
    """How and where the recipe runs: device, precision, compile, caching, processes."""

    device: str = "auto"
    precision: Precision = "auto"
    workers: int | None = None  # image decoding threads; None = CPU count
    compile: bool = False
    compile_mode: CompileMode = "default"
    cuda_graphs: bool = False  # capture the eager training step as a CUDA graph (CUDA only)
    cache_dir: str | None = None  # None = $XDG_CACHE_HOME/crystalscope; "off" = no disk cache
    cache_features: bool = False  # frozen backbone: features once, train the head
    feature_passes: int = 1  # train passes with feature caching; those after the first augmented
    cache_frozen: bool = False  # cache the frozen layers' output; train the tail + head on it
    prefix_runtime: PrefixRuntime = "auto"  # what runs the cached frozen part
    nproc: int = 1  # processes (torchrun / --nproc; docs/scaling.md)
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes (GPUs only)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in DEVICES and not value.startswith("cuda:"):
            raise ValueError(f"is not known; use {_choices(DEVICES)}")
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class TrainConfig(_Section):
    """Everything a training run needs; defaults reproduce the reference study.

    Example:
        >>> cfg = TrainConfig.from_flat({"data_dir": "split", "backbone": "resnet18", "epochs": 2})
        >>> cfg.optimiser.lr, cfg.optimiser.batch_size, cfg.model.trainable_fraction
        (0.1, 64, 0.1)
    """

    data_dir: str | None = None
    out: str | None = None  # None: runs/train, runs/train2, ... (never overwrites a run)
    resume: str | None = None
    positive_class: str | None = None  # default: pg when present, else the last class (binary)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seeds are 32-bit
    onnx: bool = True
    # fraction of valid (val) images the rejection threshold rejects; 0 = no fit (docs/ood.md)
    reject_fpr: float = 0.01
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimiser: OptimiserConfig = Field(default_factory=OptimiserConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    stopping: StoppingConfig = Field(default_factory=StoppingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @classmethod
    def from_flat(cls, values: dict) -> "TrainConfig":
        """Build from flat keys (``{"lr": 0.01}``); no cross-field checks (see :func:`validate`)."""
        return cls.model_validate(_nest(values))

    def to_dict(self) -> dict:
        """Flat ``{key: value}`` in section order (checkpoints and benchmark records store this)."""
        return flat_values(self.model_dump())

    @property
    def caches_features(self) -> bool:
        """``--cache-features`` (frozen backbone) or ``--cache-frozen`` (frozen part of it)."""
        return bool(self.runtime.cache_features or self.runtime.cache_frozen)

    def validate_values(self) -> "TrainConfig":
        """Ranges and combinations a user can get wrong (types are checked on construction)."""
        validate(self)
        return self


SECTIONS = {name: info.annotation for name, info in TrainConfig.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, _Section)}
TOP_LEVEL = tuple(name for name in TrainConfig.model_fields if name not in SECTIONS)
#: flat key -> its section (None for the top-level keys)
SECTION_OF: dict[str, str | None] = {**{k: None for k in TOP_LEVEL},
                                     **{k: s for s, cls in SECTIONS.items() for k in cls.model_fields}}


def _choices(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def choices(field: str) -> tuple[str, ...]:
    """The allowed values of a choice field, e.g. ``choices("precision") == ("auto", "fp32", "bf16")``."""
    section = SECTION_OF[field]
    annotation = (SECTIONS[section] if section else TrainConfig).model_fields[field].annotation
    if field == "device":
        return DEVICES
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _nest(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        section = SECTION_OF[key]
        (nested.setdefault(section, {}) if section else nested)[key] = value
    return nested


def flat_values(nested: dict) -> dict:
    """``{"optimiser": {"lr": 0.1}, "seed": 0}`` -> ``{"lr": 0.1, "seed": 0}`` (known keys kept as given)."""
    flat = {}
    for key, value in nested.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def defaults() -> dict:
    """Every flat key with its default value (the reference recipe)."""
    return TrainConfig().to_dict()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Raise a one-line :class:`CrystalscopeError` naming the option for a bad range or combination."""
    def bad(option: str, why: str):
        raise CrystalscopeError(f"{_flag(option)}: {why}")

    m, o, a, s, r = cfg.model, cfg.optimiser, cfg.augmentation, cfg.stopping, cfg.runtime
    if r.cuda_graphs and r.compile:
        bad("cuda_graphs", "and --compile both replace the training step; choose one "
            "(--compile --compile-mode reduce-overhead also uses CUDA graphs)")
    numbers = {"lr": o.lr, "momentum": o.momentum, "trainable_fraction": m.trainable_fraction,
               "f1_threshold": s.f1_threshold, "rotation": a.rotation, "shift": a.shift, "zoom": a.zoom}
    for name, value in numbers.items():
        if not math.isfinite(value):
            bad(name, f"{value} is not a finite number")
    if not 0.0 <= o.momentum < 1.0:
        bad("momentum", f"{o.momentum} must be in [0, 1)")
    if not 0.0 <= m.trainable_fraction <= 1.0:
        bad("trainable_fraction", f"{m.trainable_fraction} must be between 0 and 1")
    if r.nproc > 1 and r.cuda_graphs:
        bad("cuda_graphs", "runs in one process; leave it out with --nproc (or torchrun)")
    counts = {"batch_size": o.batch_size, "epochs": o.epochs, "image_size": m.image_size,
              "f1_patience": s.f1_patience, "patience": s.patience, "feature_passes": r.feature_passes,
              "nproc": r.nproc}
    for name, value in counts.items():
        if value < 1:
            bad(name, f"{value} must be at least 1")
    if o.lr <= 0:
        bad("lr", f"{o.lr} must be positive")
    if o.batch_size < 2:
        # BatchNorm cannot normalise one image: every step would be skipped and nothing learnt
        bad("batch_size", f"{o.batch_size} is too small: BatchNorm needs at least 2 images per step")
    if r.workers is not None and r.workers < 1:
        bad("workers", f"{r.workers} must be at least 1")
    if r.cache_features and m.trainable_fraction != 0:
        bad("cache_features", "needs a frozen backbone; add --trainable-fraction 0 (or use --cache-frozen "
            "to cache only the frozen layers and train the rest)")
    if not 0.0 <= cfg.reject_fpr < 0.5:
        bad("reject_fpr", f"{cfg.reject_fpr} must be in [0, 0.5): e.g. 0.01 rejects 1 % of valid crops, "
            "0 turns rejection off")
    if len(m.head_hidden) != len(m.head_dropout):
        bad("head_dropout", "needs one value per head_hidden layer")


def _merge(base: dict, sources: dict, updates: dict, source: str) -> None:
    """Flat ``updates`` into ``base`` (unknown keys are an error); ``sources`` says who set each key."""
    for key, value in flat_values(updates).items():
        name = str(key).replace("-", "_")
        if name not in SECTION_OF:
            close = difflib.get_close_matches(name, list(SECTION_OF), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CrystalscopeError(f"{source}: unknown key {key!r}{hint}")
        base[name], sources[name] = value, source


def _type_error(exc: ValidationError, values: dict, sources: dict) -> CrystalscopeError:
    """The first problem pydantic found, as one line naming where the value came from."""
    error = exc.errors()[0]
    name = next((str(part) for part in error["loc"] if part in SECTION_OF), str(error["loc"][-1]))
    value = values.get(name, error.get("input"))
    if error["type"] == "literal_error":
        problem = f"is not known; use {_choices(choices(name))}"
    elif error["type"] in _RANGE_ERRORS:  # a Field constraint: say the whole range, not one bound
        each = "each value " if len(error["loc"]) > 2 or isinstance(error["loc"][-1], int) else ""
        problem = f"is out of range: {each}must be in {allowed_range(name, error.get('ctx'))}"
        value = error.get("input") if each else value
    elif error["msg"].startswith("Value error, "):  # a validator's own sentence
        problem = error["msg"].removeprefix("Value error, ")
    else:
        problem = f"is not valid ({error['msg']})"
    source = sources.get(name, "option")
    if source == "option":  # typed on the command line (or --set): name the option
        return CrystalscopeError(f"{_flag(name)}: {value!r} {problem}")
    return CrystalscopeError(f"{source}: {name}={value!r} {problem}")


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def field_bounds(name: str) -> dict:
    """A field's numeric bounds (``ge``/``gt``/``le``/``lt``), of its items for a list field.

    Example:
        >>> field_bounds("head_dropout")
        {'ge': 0, 'lt': 1}
    """
    section = SECTION_OF.get(name)
    info = (SECTIONS[section] if section else TrainConfig).model_fields[name]
    metadata = list(info.metadata)
    for arg in get_args(info.annotation):  # list[Annotated[int, Field(ge=1)]]: the item's constraints
        metadata += getattr(arg, "__metadata__", ())
        for item in getattr(arg, "__metadata__", ()):
            metadata += getattr(item, "metadata", [])
    bounds = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    return bounds


def allowed_range(name: str, ctx: dict | None = None) -> str:
    """The range of a constrained key as an interval (``ctx``: pydantic's bounds for a key not in the config).

    Example:
        >>> allowed_range("seed"), allowed_range("head_dropout")
        ('[0, 4294967295]', '[0, 1)')
    """
    bounds = {k: int(v) if float(v).is_integer() else v
              for k, v in (field_bounds(name) if name in SECTION_OF else dict(ctx or {})).items()}
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else "(-inf"
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else "inf)"
    return f"{low}, {high}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise CrystalscopeError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise CrystalscopeError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise CrystalscopeError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise CrystalscopeError(f"--config {path}: nested too deeply to be a config of option: value") from None
    if not isinstance(loaded, dict):
        raise CrystalscopeError(f"--config {path}: expected a mapping of option: value, not a "
                                f"{type(loaded).__name__}")
    for section in SECTIONS:
        if section in loaded and not isinstance(loaded[section], dict):
            raise CrystalscopeError(f"--config {path}: {section} must be a mapping of option: value, not "
                                    f"{loaded[section]!r}"[:200])
    return loaded


def load_config(yaml_path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file (flat or in sections) <- overrides (flat keys; None values ignored).

    Raises:
        CrystalscopeError: missing/invalid YAML, an unknown key, or an invalid value.

    Example:
        >>> load_config(None, {"backbone": "resnet18", "lr": None}).model.backbone
        'resnet18'
    """
    values: dict = {}
    sources: dict = {}
    if yaml_path is not None:
        _merge(values, sources, _read_yaml(Path(yaml_path)), f"--config {Path(yaml_path)}")
    _merge(values, sources, {k: v for k, v in (overrides or {}).items() if v is not None}, "option")
    try:
        cfg = TrainConfig.from_flat(values)
    except ValidationError as exc:
        raise _type_error(exc, values, sources) from None
    return cfg.validate_values()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML in sections (atomically); :func:`load_config` reads it back."""
    return write_text(path, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
