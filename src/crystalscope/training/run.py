"""One training run from a split folder to every deliverable, as short steps.

``train(config)`` = :func:`build_session` (model, weights, optimizer, stopping, resume state)
-> :func:`load_data` (decode once, uint8 cache) -> :func:`open_run` (run folder, config) ->
:func:`fit` (epochs, metrics.csv, best/last checkpoints) -> :func:`finalize` (temperature on
val, test report, plots, ONNX). ``evaluate_checkpoint`` writes the same test report for a saved
model on any folder of class folders.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from crystalscope.config import TrainConfig, load_config, save_config
from crystalscope.data.augment import AugmentSpec, augment_batch
from crystalscope.data.dataset import ImageFolder, decode_images, index_folder, index_split, load_images
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.io import atomic_dir, write_json, write_text
from crystalscope.safety import check_output, claim_output
from crystalscope.models.factory import (CrystalClassifier, HeadSpec, build_model, default_preprocessing,
                                         set_trainable_fraction)
from crystalscope.training import distributed, loop
from crystalscope.training.distributed import World
from crystalscope.models.checkpoint import (load_checkpoint, make_checkpoint, model_from_checkpoint,
                                              preprocessing_from_checkpoint, save_checkpoint)
from crystalscope.models.precision import place_model, use_bf16
from crystalscope.training.record import (ENVIRONMENT_FILE, data_hash, environment_record, restore_rng_states,
                                          rng_states, weights_hash)
from crystalscope.evaluation.report import REPORT_FILES
from crystalscope.training.steps import GraphedTrainStep, TrainStep
from crystalscope.training.stopping import StoppingState

SPLITS = ("train", "val", "test")
# what `train` writes into a run folder (the demo may replace only a folder of these)
# (the test report's files are named once, by evaluation.report, which `evaluate` writes alone)
RUN_FILES = ("config.yaml", ENVIRONMENT_FILE, "metrics.csv", "metrics_plot.png", "weights", *REPORT_FILES,
             "model.onnx")


@dataclass
class Session:
    """Everything :func:`fit` and :func:`finalize` share (one run, in memory)."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    splits: dict[str, ImageFolder]
    class_names: list[str]
    positive_class: str | None
    preprocessing: Preprocessing
    head: HeadSpec
    bf16: bool = False  # bf16 autocast (``precision``; on CUDA by default)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # uint8 images or features
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    image_stats: dict[str, np.ndarray] = field(default_factory=dict)  # per split, for the rejection fit
    model: CrystalClassifier | None = None
    trained: torch.nn.Module | None = None  # the whole model, or what follows the cached part
    feature_extractor: torch.nn.Module | None = None  # the cached (frozen) part, with caching on
    forward: torch.nn.Module | None = None  # `trained`, possibly torch.compile'd
    train_step: TrainStep | None = None  # kept across epochs (a captured CUDA graph); None = eager
    optimizer: torch.optim.Optimizer | None = None
    stopping: StoppingState | None = None
    start_epoch: int = 0
    shuffle_rng: torch.Generator | None = None
    augment_rng: torch.Generator | None = None
    weights_source: str = ""
    initial_weights: str = ""  # content hash of the weights training started from
    data_hashes: dict[str, str] = field(default_factory=dict)  # split -> content hash
    resume_rng: dict | None = None  # global RNG states to restore when the resumed epochs start
    # several processes (training/distributed.py): this rank, and the rows of each split it holds
    world: World = field(default_factory=World)
    shard_index: dict[str, np.ndarray] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))  # no hard wraps in paths

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"


# ---- run folder and config ----------------------------------------------------------------

def next_run_dir(base: str | Path = "runs", name: str = "train") -> Path:
    """``runs/train``, then ``runs/train2``, ``runs/train3``, ... (never an existing folder)."""
    base = Path(base)
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}{n}"
    return candidate


def config_for_resume(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The saved ``config.yaml`` of ``run_dir`` with the given overrides (e.g. more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "weights" / "last.ckpt").is_file() or not (run_dir / "config.yaml").is_file():
        raise CrystalscopeError(f"--resume {run_dir}: no config.yaml and weights/last.ckpt there; is it a run folder?")
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(resume=str(run_dir), out=str(run_dir))
    return load_config(run_dir / "config.yaml", values)


def target_run_dir(config: TrainConfig) -> Path:
    """The run folder: ``--resume``'s, ``--out`` (must be new or empty), or the next free one."""
    if config.resume:
        return Path(config.resume)
    run_dir = Path(config.out) if config.out else next_run_dir()
    if run_dir.is_dir() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise CrystalscopeError(f"--out {run_dir}: folder exists and is not empty; choose another "
                                f"--out or continue it with --resume {run_dir}")
    check_output(run_dir, inputs=[config.data_dir, config.weights_file], kind="folder")
    return run_dir


def open_run(config: TrainConfig, run_dir: Path, environment: dict | None = None) -> TrainConfig:
    """Create (or reopen with ``--resume``) the run folder; save the resolved config and
    the reproducibility record ``environment.json``."""
    (run_dir / "weights").mkdir(parents=True, exist_ok=True)
    config.out = str(run_dir)
    save_config(config, run_dir / "config.yaml")
    if environment is not None:
        write_json(run_dir / ENVIRONMENT_FILE, environment)
    return config


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CrystalscopeError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return torch.device(name)


# ---- data ---------------------------------------------------------------------------------

def _place(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images on the GPU when they fit comfortably, else pinned host memory (CUDA)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    return tensor.to(device) if tensor.nbytes < 0.25 * free else tensor.pin_memory()


def load_data(cfg: TrainConfig, splits: dict[str, ImageFolder], preprocessing: Preprocessing,
              device: torch.device, progress: bool) -> tuple[dict, dict]:
    """Decode each split once (or read the on-disk cache); returns (images, labels) tensors."""
    images, labels = {}, {}
    for split in SPLITS:
        folder = splits[split]
        array = load_images(folder.paths, preprocessing, workers=cfg.workers, cache_dir=cfg.cache_dir,
                            description=f"decoding {split}", progress=progress)
        images[split] = _place(array, device)
        labels[split] = torch.from_numpy(folder.labels).to(device)
    return images, labels


# ---- model, optimizer, stopping -----------------------------------------------------------

def build_session(session: Session, last: dict | None) -> None:
    """Model with pretrained (or resumed) weights, trainable fraction, optimizer, stopping."""
    from crystalscope.models.weights import load_pretrained

    cfg, device = session.config, session.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.backbone, len(session.class_names), session.head)
    if last is None:
        session.weights_source = load_pretrained(model.backbone, cfg.backbone, cfg.weights, cfg.weights_file)
        session.initial_weights = weights_hash(model)
    else:
        model.load_state_dict(last["model_state"])
        session.weights_source = last["training"].get("weights_source") or "unknown"
        session.initial_weights = last["training"].get("initial_weights_sha256", "")
    n_train, n_total = set_trainable_fraction(model.backbone, cfg.trainable_fraction)
    place_model(model, device)
    session.model = model
    if caches_features(cfg):
        from crystalscope.training.features import split_for_caching

        session.feature_extractor, session.trained = split_for_caching(model, cfg.image_size)
    else:
        session.trained = model
    params = [p for p in session.trained.parameters() if p.requires_grad]
    lr = distributed.scaled_lr(cfg.lr, cfg.lr_scaling, session.world)
    session.optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    session.stopping = StoppingState(cfg.f1_threshold, cfg.f1_patience, cfg.patience)
    session.shuffle_rng = torch.Generator().manual_seed(cfg.seed)
    session.augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if last is not None:
        state = last["training"]
        session.optimizer.load_state_dict(state["optimizer"])
        for group in session.optimizer.param_groups:
            group["lr"] = lr  # the rule for this run's number of processes, which may differ from the saved one
        session.stopping = StoppingState.from_dict(state["stopping"])
        session.start_epoch = int(state["epoch"])
        session.shuffle_rng.set_state(state["shuffle_rng"])
        if not caches_features(cfg):
            # with feature caching the augment stream is only used to build the cached features,
            # which a resumed run rebuilds from the start: keep it freshly seeded
            session.augment_rng.set_state(state["augment_rng"])
        session.resume_rng = state.get("rng")
    # distributed hook: a DDP replica with several processes, `trained` itself with one
    replica = distributed.wrap_model(session.trained, session.world, device, cfg.sync_bn)
    session.forward = torch.compile(replica, mode=cfg.compile_mode) if cfg.compile else replica
    if cfg.cuda_graphs:
        session.train_step = GraphedTrainStep(session.trained, session.optimizer, device, session.bf16)
    session.console.print(
        f"{cfg.backbone}: weights {session.weights_source}; {n_train}/{n_total} backbone layers trainable; "
        f"{len(session.class_names)} classes ({', '.join(session.class_names)}); device {device}"
        + (" (bf16 autocast)" if session.bf16 else "")
        + (f"; torch.compile mode {cfg.compile_mode}" if cfg.compile else "")
        + ("; CUDA graph training step" if cfg.cuda_graphs else "")
        + (f"; {session.world.size} processes: effective batch {cfg.batch_size * session.world.size} "
           f"({cfg.batch_size} per process), lr {lr:g} (--lr-scaling {cfg.lr_scaling})"
           + (", synchronised BatchNorm" if cfg.sync_bn else "") if session.world.enabled else ""))


def caches_features(cfg: TrainConfig) -> bool:
    """``--cache-features`` (frozen backbone) or ``--cache-frozen`` (frozen part of it)."""
    return bool(cfg.cache_features or cfg.cache_frozen)


def cache_features(session: Session, progress) -> None:
    """Replace the images in ``session.inputs`` by the frozen part's output (feature caching)."""
    from crystalscope.training.features import split_features

    cfg = session.config
    feats, labels = split_features(_prefix_runner(session), session.inputs, session.labels, session.preprocessing,
                                   batch_size=cfg.batch_size, device=session.device, augment=augment_spec(cfg),
                                   passes=cfg.feature_passes, generator=session.augment_rng, progress=progress,
                                   bf16=session.bf16)
    session.inputs, session.labels = feats, labels


def _prefix_runner(session: Session):
    """The frozen part as ONNX Runtime runs it when that is numerically the same, else PyTorch."""
    from crystalscope.training.onnx_prefix import choose_prefix

    check = session.preprocessing.normalize_torch(session.inputs["train"][:16].to(session.device))
    runner, line = choose_prefix(session.feature_extractor, check, session.config.prefix_runtime,
                                 session.device, session.bf16)
    session.console.print(line)
    return runner


def augment_spec(cfg: TrainConfig) -> AugmentSpec:
    return AugmentSpec(cfg.rotation, cfg.shift, cfg.zoom, cfg.hflip, cfg.vflip)


def transforms(session: Session) -> tuple[Callable, Callable]:
    """(train transform, eval transform) from raw batch on the device to model input."""
    if caches_features(session.config):
        return (lambda x: x), (lambda x: x)
    pre, spec = session.preprocessing, augment_spec(session.config)
    return ((lambda x: augment_batch(x, pre, spec, generator=session.augment_rng)),
            pre.normalize_torch)


# ---- checkpoints and metrics.csv ----------------------------------------------------------

def checkpoint(session: Session, epoch: int, temperature: float = 1.0) -> dict:
    """The self-describing checkpoint of the current model, with resumable training state."""
    cfg = session.config
    training = {"epoch": int(epoch), "optimizer": session.optimizer.state_dict(),
                "stopping": session.stopping.to_dict(), "config": cfg.to_dict(), "seed": int(cfg.seed),
                "shuffle_rng": session.shuffle_rng.get_state(), "augment_rng": session.augment_rng.get_state(),
                "weights_source": session.weights_source, "rng": rng_states(),
                "initial_weights_sha256": session.initial_weights, "data_sha256": dict(session.data_hashes)}
    return make_checkpoint(session.model, backbone=cfg.backbone, head=session.head,
                           class_names=session.class_names, positive_class=session.positive_class,
                           preprocessing=session.preprocessing, temperature=temperature, training=training)


def metrics_columns(class_names: list[str]) -> list[str]:
    """The metrics.csv header agreed in INTERFACES.md."""
    per_class = [f"val_{m}_{c}" for c in class_names for m in ("precision", "recall", "f1")]
    return (["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"]
            + per_class + ["val_weighted_f1", "lr", "epoch_time_s"])


def write_metrics_row(path: Path, columns: list[str], row: dict, keep_until_epoch: int) -> None:
    """Rewrite metrics.csv atomically with the rows of earlier epochs plus ``row``."""
    rows = []
    if path.is_file():
        rows = [r for r in csv.DictReader(io.StringIO(path.read_text())) if int(r["epoch"]) <= keep_until_epoch]
    rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _metrics_row(epoch: int, train_stats: dict, val: dict, metrics: dict, lr: float, seconds: float) -> dict:
    row = {"epoch": epoch, "train_loss": f"{train_stats['loss']:.6f}",
           "train_accuracy": f"{train_stats['accuracy']:.6f}", "val_loss": f"{val['loss']:.6f}",
           "val_accuracy": f"{metrics['accuracy']:.6f}", "val_macro_f1": f"{metrics['macro']['f1']:.6f}"}
    for name, scores in metrics["per_class"].items():
        for key in ("precision", "recall", "f1"):
            row[f"val_{key}_{name}"] = f"{scores[key]:.6f}"
    row.update(val_weighted_f1=f"{metrics['weighted']['f1']:.6f}", lr=f"{lr:g}", epoch_time_s=f"{seconds:.3f}")
    return row


# ---- the epochs ---------------------------------------------------------------------------

def _progress(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=True)


def run_epoch(session: Session, epoch: int, bar) -> dict:
    """Train one epoch, evaluate the whole val split, log, and save checkpoints."""
    from crystalscope.evaluation.metrics import classification_metrics, format_class_lines

    cfg, console = session.config, session.console
    train_tf, eval_tf = transforms(session)
    n_steps = -(-session.inputs["train"].shape[0] // cfg.batch_size) + -(-session.inputs["val"].shape[0] // cfg.batch_size)
    task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=n_steps) if bar else None
    step = (lambda: bar.advance(task)) if bar else None
    # distributed hook: each rank's shuffle and augmentation order from (seed, epoch, rank)
    distributed.reseed_epoch([session.shuffle_rng, session.augment_rng], cfg.seed, epoch, session.world)
    started = time.perf_counter()
    train_stats = loop.train_one_epoch(session.forward, session.inputs["train"], session.labels["train"],
                                       session.optimizer, transform=train_tf, batch_size=cfg.batch_size,
                                       device=session.device, generator=session.shuffle_rng,
                                       drop_last=cfg.compile or cfg.cuda_graphs, on_step=step, bf16=session.bf16,
                                       step=session.train_step)
    train_seconds = time.perf_counter() - started  # .item() in train_one_epoch already synchronised
    train_stats = distributed.reduce_train_stats(train_stats, session.world)
    val = evaluate_split(session, "val", session.forward, eval_tf, on_step=step)
    seconds = time.perf_counter() - started
    if bar:
        bar.remove_task(task)
    lr = session.optimizer.param_groups[0]["lr"]
    check_finite(session, epoch, train_stats["loss"], val["loss"])
    metrics = classification_metrics(session.splits["val"].labels, val["logits"], session.class_names)
    row = _metrics_row(epoch, train_stats, val, metrics, lr, seconds)
    if session.world.is_main:  # distributed hook: only rank 0 writes
        write_metrics_row(session.run_dir / "metrics.csv", metrics_columns(session.class_names), row, epoch - 1)
    improved = session.stopping.update(epoch, val["loss"], [s["f1"] for s in metrics["per_class"].values()])
    rate = train_stats["samples"] / max(train_seconds, 1e-9)
    console.print(f"Epoch {epoch}/{cfg.epochs} - {seconds:.1f} s (training {rate:.0f} img/s) - "
                  f"loss: {train_stats['loss']:.4f} - accuracy: {train_stats['accuracy']:.4f} - "
                  f"val_loss: {val['loss']:.4f} - val_accuracy: {metrics['accuracy']:.4f}"
                  + (" (best)" if improved else ""))
    for line in format_class_lines(metrics):
        console.print(f"  {line}", highlight=False)
    if not session.world.is_main:
        return row
    ckpt = checkpoint(session, epoch)
    if improved:
        save_checkpoint(ckpt, session.weights_dir / "best.ckpt")
    save_checkpoint(ckpt, session.weights_dir / "last.ckpt")
    return row


def evaluate_split(session: Session, split: str, model: torch.nn.Module, transform: Callable,
                   on_step: Callable | None = None) -> dict:
    """Logits (whole split, in order), loss and accuracy of ``model`` on ``split``.

    With several processes each rank evaluates its shard with rank 0's BatchNorm buffers and
    the rows are gathered: every image once, the numbers of a one-process evaluation.
    """
    cfg, world = session.config, session.world
    if not world.enabled:
        return loop.evaluate(model, session.inputs[split], session.labels[split], transform=transform,
                             batch_size=cfg.batch_size, device=session.device, on_step=on_step, bf16=session.bf16)
    distributed.sync_buffers(session.trained, world)
    # the plain module, not the DDP replica: shards differ in length, and eval needs no gradient sync
    local = loop.evaluate(session.trained, session.inputs[split], None, transform=transform,
                          batch_size=cfg.batch_size, device=session.device, on_step=on_step, bf16=session.bf16)
    logits = distributed.gather_logits(local["logits"], session.shard_index[split], len(session.splits[split]), world)
    scores, labels = torch.from_numpy(logits), torch.from_numpy(session.splits[split].labels).long()
    return {"logits": logits, "loss": float(torch.nn.functional.cross_entropy(scores, labels)),
            "accuracy": float((scores.argmax(1) == labels).float().mean())}


class TrainingDiverged(CrystalscopeError):
    """The loss became NaN or infinite: the run stops, keeping the last good checkpoint."""

    exit_code = 1


def check_finite(session: Session, epoch: int, train_loss: float, val_loss: float) -> None:
    """Stop the run (before this epoch's checkpoints are saved) when a loss is not finite.

    Raises:
        TrainingDiverged: naming the epoch, the learning rate and what was kept.
    """
    if np.isfinite(train_loss) and np.isfinite(val_loss):
        return
    cfg = session.config
    kept = (f"{session.weights_dir / 'last.ckpt'} keeps epoch {epoch - 1}" if epoch > 1 else
            "no checkpoint was saved")
    raise TrainingDiverged(f"training diverged in epoch {epoch}: the {'training' if not np.isfinite(train_loss) else 'val'} "
                           f"loss is {train_loss if not np.isfinite(train_loss) else val_loss}; lower --lr "
                           f"(now {cfg.lr:g}) or raise --batch-size (now {cfg.batch_size}); {kept}")


def fit(session: Session, progress: bool) -> None:
    """Epochs until a stopping rule fires or ``epochs`` is reached; Ctrl-C keeps last.ckpt."""
    cfg = session.config
    epoch = session.start_epoch
    threads = torch.get_num_threads()
    if caches_features(cfg) and session.inputs["train"].dim() == 2 and session.device.type == "cpu":
        # head-only steps are tiny matmuls: extra threads only add sync cost (10x slower
        # measured with 2 threads on a busy 2-core machine)
        torch.set_num_threads(1)
    # a resumed run continues the uninterrupted one's random stream (dropout, ...) exactly
    restore_rng_states(session.resume_rng)
    try:
        with _progress(progress) as bar:
            while epoch < cfg.epochs and not session.stopping.should_stop:
                run_epoch(session, epoch + 1, bar)
                epoch += 1
    except KeyboardInterrupt:
        session.console.print(
            f"interrupted during epoch {epoch + 1}: {session.weights_dir / 'last.ckpt'} holds epoch {epoch}; "
            f"continue with `crystalscope train --resume {session.run_dir}`")
        raise
    finally:
        torch.set_num_threads(threads)
    if session.stopping.should_stop:
        session.console.print(f"stopped after epoch {epoch}: {session.stopping.reason}")
    session.console.print(f"best epoch {session.stopping.best_epoch} (val loss {session.stopping.best_loss:.4f})")


# ---- rejection of foreign images (docs/ood.md) --------------------------------------------

class FeaturesAndLogits(torch.nn.Module):
    """What ``trained`` computes, returned as ``[penultimate features | logits]`` in one tensor.

    ``loop.evaluate`` collects one output per batch; packing both keeps that one loop for the
    rejection fit. ``trained`` is the whole model, its head (cached backbone features) or the
    trainable backbone tail followed by the head (cached frozen maps).
    """

    def __init__(self, trained: torch.nn.Module, model: CrystalClassifier):
        super().__init__()
        if trained is model:
            self.body = model.backbone
        elif trained is model.head:
            self.body = torch.nn.Identity()
        else:
            self.body = torch.nn.Sequential(*list(trained)[:-1])
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head[:-1](self.body(x))
        return torch.cat([features, self.head[-1](features)], dim=1)


def split_features_and_logits(session: Session, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features ``(N, D)`` and logits ``(N, C)`` of one split's inputs, in order."""
    _, eval_tf = transforms(session)
    packed = loop.evaluate(FeaturesAndLogits(session.trained, session.model), session.inputs[split], None,
                           transform=eval_tf, batch_size=session.config.batch_size, device=session.device,
                           bf16=session.bf16)["logits"]
    n_classes = len(session.class_names)
    return packed[:, :-n_classes], packed[:, -n_classes:]


def split_image_statistics(images: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """:func:`~crystalscope.evaluation.ood.image_statistics` of uint8 ``(N, H, W, 3)`` images, in chunks."""
    from crystalscope.evaluation.ood import IMAGE_STATISTICS, image_statistics

    parts = [image_statistics(images[i:i + chunk].cpu().numpy()) for i in range(0, images.shape[0], chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, len(IMAGE_STATISTICS)))


def fit_rejection(session: Session) -> tuple[dict, np.ndarray]:
    """Fit the OOD score on the train split and its threshold on val; returns (params, test scores)."""
    from crystalscope.evaluation.ood import fit_detector

    started = time.perf_counter()
    train_features, _ = split_features_and_logits(session, "train")
    val_features, val_logits = split_features_and_logits(session, "val")
    test_features, test_logits = split_features_and_logits(session, "test")
    stats = session.image_stats
    # with --feature-passes k the training features are k passes over the same images
    train_stats = np.tile(stats["train"], (len(train_features) // max(len(stats["train"]), 1), 1))
    detector = fit_detector(train_features, session.labels["train"].cpu().numpy(), val_features, val_logits,
                            len(session.class_names), session.config.reject_fpr,
                            train_image_stats=train_stats, val_image_stats=stats["val"])
    session.console.print(f"rejection: {detector.method} score on {train_features.shape[1]}-d features, threshold "
                          f"{detector.threshold:.4g} rejects {detector.val_rejection_rate:.1%} of val "
                          f"(target {detector.target_fpr:.1%}); fitted in {time.perf_counter() - started:.1f} s")
    return detector.to_dict(), detector.score(test_features, test_logits, stats["test"])


# ---- deliverables -------------------------------------------------------------------------

def finalize(session: Session) -> dict:
    """Best weights -> temperature on val -> test report, plots, ONNX; returns the summary."""
    from crystalscope.evaluation.calibration import fit_temperature
    from crystalscope.evaluation.plots import plot_training_curves
    from crystalscope.evaluation.report import write_test_report

    cfg, run_dir = session.config, session.run_dir
    best_path = session.weights_dir / "best.ckpt"
    # distributed hook: rank 0 reads best.ckpt and sends it (other machines need not see its disk)
    best = distributed.from_main(lambda: load_checkpoint(best_path), session.world)
    session.model.load_state_dict(best["model_state"])
    _, eval_tf = transforms(session)

    def logits(split: str) -> np.ndarray:
        return evaluate_split(session, split, session.trained, eval_tf)["logits"]

    temperature = fit_temperature(logits("val"), session.splits["val"].labels)
    test_logits = logits("test")
    if not session.world.is_main:  # only rank 0 writes the report, plots and ONNX
        return {"run_dir": str(run_dir), "rank": session.world.rank}
    best["temperature"] = float(temperature)
    rejection = None
    if cfg.reject_fpr > 0 and session.world.enabled:
        # each rank holds only its shard of the images: the fit needs them all (docs/scaling.md)
        session.console.print("rejection: not fitted in a multi-process run; fit it afterwards on one process "
                              "or train without --nproc (docs/scaling.md)")
    elif cfg.reject_fpr > 0:
        best["ood"], test_scores = fit_rejection(session)
        rejection = {**best["ood"], "scores": test_scores}
    save_checkpoint(best, best_path)
    test = session.splits["test"]
    result = write_test_report(run_dir, y_true=test.labels, logits=test_logits, class_names=session.class_names,
                               positive_class=session.positive_class, paths=[str(p) for p in test.paths],
                               temperature=temperature, seed=cfg.seed, rejection=rejection,
                               meta={"model": f"{cfg.backbone} ({best_path})", "data": str(test.root),
                                     "best_epoch": int(best["training"]["epoch"])})
    plot_training_curves(run_dir / "metrics.csv", run_dir / "metrics_plot.png")
    if cfg.onnx:
        from crystalscope.export.onnx import export_checkpoint

        export = export_checkpoint(best_path, run_dir / "model.onnx", check_images=list(test.paths[:8]))
        session.console.print(f"model.onnx: ONNX Runtime matches PyTorch (max |dp| {export['max_abs_diff']:.1e})")
    session.console.print(f"test: accuracy {result['accuracy']:.4f}, macro F1 {result['macro']['f1']:.4f}, "
                          f"{result['n_missed']} of {result['n_images']} missed; temperature {temperature:.3f}")
    session.console.print(f"results in {run_dir}")
    return {"run_dir": str(run_dir), "best_epoch": int(best["training"]["epoch"]),
            "epochs_run": len(_read_epochs(run_dir / "metrics.csv")), "stop_reason": session.stopping.reason,
            "temperature": float(temperature), "test": result}


def _read_epochs(path: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader(io.StringIO(path.read_text()))] if path.is_file() else []


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train, evaluate and export as described by ``config``; returns a summary dict.

    Example:
        >>> from crystalscope.config import load_config
        >>> cfg = load_config(None, {"data_dir": "split", "backbone": "resnet18", "weights": "none",
        ...                          "image_size": 64, "epochs": 2, "out": "runs/tiny"})
        >>> train(cfg)["test"]["macro"]["f1"]  # doctest: +SKIP
        0.98
    """
    config.validate()
    if config.data_dir is None:
        raise CrystalscopeError("train: give DATA_DIR (a folder with train/, val/ and test/)")
    world = distributed.world_from_env()
    if config.nproc > 1 and not world.enabled:
        return launch_processes(config)
    if world.enabled:
        config.nproc = world.size  # the saved config states how many processes trained it
    device = distributed.init(world, resolve_device(config.device))
    with distributed.running(world):
        # rank 0 decides the run folder (next free name) and every rank uses its answer
        run_dir, problem = distributed.from_main(lambda: _decide_run_dir(config), world)
        if problem:
            raise CrystalscopeError(problem)
        # the one output rule: never inside the data; one writer per run folder; stale .tmp removed
        claim = (claim_output(run_dir, inputs=[config.data_dir, config.weights_file], kind="folder",
                              resume=bool(config.resume)) if world.is_main else contextlib.nullcontext())
        with claim:
            return _train_into(config, run_dir, progress and world.is_main, world, device)


def _decide_run_dir(config: TrainConfig) -> tuple[Path | None, str | None]:
    try:
        return target_run_dir(config), None
    except CrystalscopeError as exc:
        return None, str(exc)


def launch_processes(config: TrainConfig) -> dict:
    """``--nproc N`` without torchrun: start N ranks on this machine (see
    :func:`crystalscope.training.distributed.launch`) with this config, and wait for them."""
    import tempfile

    config.out = str(target_run_dir(config))  # decided here, so the summary can name it
    with tempfile.TemporaryDirectory(prefix="crystalscope-launch-") as tmp:
        config_yaml = save_config(config, Path(tmp) / "config.yaml")
        distributed.launch(str(config_yaml), config.nproc, config.out)
    return {"run_dir": config.out, "nproc": config.nproc}


def _train_into(config: TrainConfig, run_dir: Path, progress: bool, world: World = World(),
                device: torch.device | None = None) -> dict:
    from crystalscope.evaluation.report import resolve_positive_class

    last = (distributed.from_main(lambda: load_checkpoint(run_dir / "weights" / "last.ckpt"), world)
            if config.resume else None)
    splits = index_split(config.data_dir)
    class_names = splits["train"].class_names
    if last is not None and list(last["class_names"]) != class_names:
        raise CrystalscopeError(f"--resume {run_dir}: the data's classes ({', '.join(class_names)}) differ from "
                                f"the run's ({', '.join(last['class_names'])})")
    positive = resolve_positive_class(class_names, config.positive_class.lower() if config.positive_class else None)
    device = device if device is not None else resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise CrystalscopeError(f"--cuda-graphs: needs a CUDA GPU, and this run's device is {device.type}; "
                                "leave it out (or use --device cuda on a machine with a GPU)")
    session = Session(config=config, run_dir=run_dir, device=device, splits=splits, class_names=class_names,
                      positive_class=positive, bf16=use_bf16(device, config.precision),
                      preprocessing=default_preprocessing(config.backbone, config.image_size, config.resize),
                      head=HeadSpec(hidden=list(config.head_hidden), dropout=list(config.head_dropout)),
                      world=world, console=Console(soft_wrap=True, quiet=not world.is_main))
    # model, weights and data first: a bad backbone, offline weights or an unreadable image
    # fail before the run folder exists, so nothing half-made is left behind
    build_session(session, last)
    if caches_features(config):
        from crystalscope.training.features import check_feature_memory

        rows = {s: len(f) * (config.feature_passes if s == "train" else 1) for s, f in splits.items()}
        check_feature_memory(session.feature_extractor, config.image_size, rows, device,
                             "--cache-features" if config.cache_features else "--cache-frozen")
    # distributed hook: each rank decodes (and caches) only its shard of every split
    session.shard_index = {s: distributed.shard_indices(len(f), world, pad=(s == "train")) for s, f in splits.items()}
    local = {s: distributed.shard_folder(f, session.shard_index[s]) for s, f in splits.items()} if world.enabled else splits
    session.inputs, session.labels = load_data(config, local, session.preprocessing, device, progress)
    if config.reject_fpr > 0 and not world.enabled:  # from the images, before feature caching replaces them
        session.image_stats = {s: split_image_statistics(session.inputs[s]) for s in SPLITS}
    if world.is_main:
        session.data_hashes = {name: data_hash(folder.root, folder.paths) for name, folder in splits.items()}
        open_run(config, run_dir, environment_record(seed=config.seed, device=device, data_hashes=session.data_hashes,
                                                     initial_weights=session.initial_weights,
                                                     weights_source=session.weights_source))
    if caches_features(config):
        with _progress(progress) as bar:
            started = time.perf_counter()
            cache_features(session, bar)
        shape = "x".join(str(d) for d in session.inputs["train"].shape[1:])
        session.console.print(f"backbone features cached in {time.perf_counter() - started:.1f} s "
                              f"({shape} per image)")
    fit(session, progress)
    return finalize(session)


# ---- evaluation of a saved model ----------------------------------------------------------

def predict_logits(model: torch.nn.Module, preprocessing: Preprocessing, paths: list, device, batch_size: int = 64,
                   *, workers: int | None = None, progress: bool = False) -> np.ndarray:
    """Logits ``(N, C)`` for image files in order: eval mode, no augmentation.

    Example:
        >>> ckpt = load_checkpoint("runs/train/weights/best.ckpt")  # doctest: +SKIP
        >>> predict_logits(model_from_checkpoint(ckpt), preprocessing_from_checkpoint(ckpt),
        ...                ["CEX (1).png"], "cpu").shape  # doctest: +SKIP
        (1, 2)
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    images = torch.from_numpy(decode_images(list(paths), preprocessing, workers=workers, progress=progress))
    place_model(model, device)
    return loop.evaluate(model, images, None, transform=preprocessing.normalize_torch,
                         batch_size=batch_size,
                         device=device)["logits"]


def _logits_and_rejection(ckpt: dict, model: CrystalClassifier, paths: list, device: torch.device,
                          batch_size: int, workers: int | None, progress: bool) -> tuple[np.ndarray, dict]:
    """Logits of image files plus the checkpoint's rejection with the files' OOD scores."""
    from crystalscope.evaluation.ood import OODDetector

    preprocessing = preprocessing_from_checkpoint(ckpt)
    images = torch.from_numpy(decode_images(list(paths), preprocessing, workers=workers, progress=progress))
    place_model(model, device)
    packed = loop.evaluate(FeaturesAndLogits(model, model), images, None, transform=preprocessing.normalize_torch,
                           batch_size=batch_size, device=device)["logits"]
    n_classes = len(ckpt["class_names"])
    features, logits = packed[:, :-n_classes], packed[:, -n_classes:]
    scores = OODDetector.from_dict(ckpt["ood"]).score(features, logits, split_image_statistics(images))
    return logits, {**ckpt["ood"], "scores": scores}


def evaluate_checkpoint(ckpt_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None, *,
                        batch_size: int = 64, device: str = "auto", workers: int | None = None,
                        progress: bool = True, force: bool = False) -> dict:
    """Write the test report of a saved model on a folder of class folders.

    Raises:
        CrystalscopeError: unreadable checkpoint, or class folders that are not the model's classes.
    """
    from crystalscope.evaluation.report import write_test_report

    if int(batch_size) < 1:
        raise CrystalscopeError(f"--batch-size {batch_size} must be at least 1")
    out_dir = Path(out_dir) if out_dir else next_run_dir(name="evaluate")
    check_output(out_dir, inputs=[ckpt_path, data_dir], kind="folder", force=force, owned=REPORT_FILES)
    ckpt = load_checkpoint(ckpt_path)
    folder = index_folder(data_dir, class_names=list(ckpt["class_names"]))
    warning = training_data_warning(ckpt, folder)
    model = model_from_checkpoint(ckpt)
    if ckpt.get("ood"):  # features and image statistics too, for the test rejection rate
        logits, rejection = _logits_and_rejection(ckpt, model, folder.paths, resolve_device(device), batch_size,
                                                  workers, progress)
    else:
        rejection = None
        logits = predict_logits(model, preprocessing_from_checkpoint(ckpt), folder.paths,
                                resolve_device(device), batch_size, workers=workers, progress=progress)
    meta = {"model": f"{ckpt['backbone']} ({ckpt_path})", "data": str(folder.root)}
    if warning:
        meta["warning"] = warning
    # the report folder appears under its final name only when complete (a full disk leaves nothing)
    with claim_output(out_dir, inputs=[ckpt_path, data_dir], kind="folder", force=force, owned=REPORT_FILES), \
            atomic_dir(out_dir, force=True) as staging:
        return write_test_report(staging, y_true=folder.labels, logits=logits, class_names=list(ckpt["class_names"]),
                                 positive_class=ckpt.get("positive_class"), paths=[str(p) for p in folder.paths],
                                 temperature=float(ckpt.get("temperature") or 1.0),
                                 seed=int(ckpt.get("training", {}).get("seed", 0)), rejection=rejection,
                                 meta=meta)


def training_data_warning(ckpt: dict, folder: ImageFolder) -> str | None:
    """A warning when ``folder`` holds exactly the images of the model's train or val split.

    Example:
        >>> training_data_warning(load_checkpoint("best.ckpt"), index_folder("split/train"))  # doctest: +SKIP
        'these are the images the model was trained on (split train): the scores say nothing about new images'
    """
    hashes = ckpt.get("training", {}).get("data_sha256") or {}
    seen = {h: name for name, h in hashes.items() if name in ("train", "val")}
    if not seen:
        return None
    name = seen.get(data_hash(folder.root, folder.paths))
    if name is None:
        return None
    what = "trained on" if name == "train" else "selected and calibrated on"
    return (f"{folder.root} holds the very images the model was {what} (its {name} split): "
            "these scores say nothing about new images; evaluate on the test split")
