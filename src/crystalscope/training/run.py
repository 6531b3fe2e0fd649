"""One training run from a split folder to every deliverable, readable top to bottom.

:func:`train` decides the run folder (and starts several processes with ``--nproc``), then
:func:`run_training` builds the parts once (:mod:`crystalscope.training.setup`: the data, the
learner = model + optimiser + training step, the resumable state), opens the run folder, runs
:func:`fit` (the epoch loop: train step, evaluate, stopping decision, metrics.csv row,
checkpoints; :mod:`crystalscope.training.epoch`) and :func:`~crystalscope.training.finish.finalize`
(temperature on val, test report, plots, ONNX). The library logs through ``logging`` and
returns a summary; the CLI renders it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from crystalscope.config import TrainConfig, load_config, save_config
from crystalscope.data.dataset import data_hash
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import BEST_CHECKPOINT, CONFIG_FILE, ENVIRONMENT_FILE, LAST_CHECKPOINT, RUN_FILES, WEIGHTS_DIR
from crystalscope.io import record_files, write_json
from crystalscope.models.checkpoint import load_checkpoint
from crystalscope.runtime import counter, progress_bar, resolve_device
from crystalscope.safety import check_output, claim_output, next_run_dir
from crystalscope.training import distributed
from crystalscope.training.distributed import World
from crystalscope.training.epoch import (EpochResult, RunFolder, check_finite, evaluate_split, log_epoch,
                                         save_checkpoints, steps_per_epoch, train_epoch)
from crystalscope.training.finish import finalize
from crystalscope.training.record import environment_record, restore_rng_states
from crystalscope.training.setup import (Learner, RunData, TrainState, build_learner, cache_features,
                                         check_cache_memory, index_data, load_data)

log = logging.getLogger(__name__)

COMMAND = "train"  # named in the run folder's manifest
# what train writes into a run folder, listed in its manifest when the run ends (or stops)
RECORDED = (*(name for name in RUN_FILES if name != WEIGHTS_DIR), f"{WEIGHTS_DIR}/{BEST_CHECKPOINT}",
            f"{WEIGHTS_DIR}/{LAST_CHECKPOINT}")


# ---- run folder and config ----------------------------------------------------------------

def config_for_resume(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The saved ``config.yaml`` of ``run_dir`` with the given overrides (e.g. more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_DIR / LAST_CHECKPOINT).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise CrystalscopeError(f"--resume {run_dir}: no config.yaml and weights/last.ckpt there; is it a run folder?")
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(resume=str(run_dir), out=str(run_dir))
    saved = load_config(run_dir / CONFIG_FILE, {"resume": str(run_dir), "out": str(run_dir)})
    config = load_config(run_dir / CONFIG_FILE, values)
    changed = [f"--{key.replace('_', '-')} (was {old!r}, now {new!r})"
               for key, old, new in _changed_keys(saved.to_dict(), config.to_dict()) if key not in RESUME_MAY_CHANGE]
    if changed:
        raise CrystalscopeError(f"--resume {run_dir}: {', '.join(changed)} would make the resumed run another run; "
                                "only --epochs and the stopping options (--f1-threshold, --f1-patience, --patience) "
                                "may change: start a new run with --out for the others")
    return config


#: what ``--resume`` may change: how long the run goes on, not what it computes. The split
#: folder may move (``data_dir``): its content must hash as before (:func:`check_same_data`).
RESUME_MAY_CHANGE = ("epochs", "f1_threshold", "f1_patience", "patience", "data_dir")


def _changed_keys(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved, new) for each key whose value the resumed config changes."""
    return [(key, old, new.get(key)) for key, old in saved.items() if new.get(key) != old]


def target_run_dir(config: TrainConfig) -> Path:
    """The run folder: ``--resume``'s, ``--out`` (must be new or empty), or the next free one."""
    if config.resume:
        return Path(config.resume)
    run_dir = Path(config.out) if config.out else next_run_dir()
    if run_dir.is_dir() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise CrystalscopeError(f"--out {run_dir}: folder exists and is not empty; choose another "
                                f"--out or continue it with --resume {run_dir}")
    check_output(run_dir, inputs=[config.data_dir, config.model.weights_file], kind="folder", command=COMMAND)
    return run_dir


def open_run(config: TrainConfig, run_dir: Path, environment: dict | None = None) -> TrainConfig:
    """Create (or reopen with ``--resume``) the run folder; save the resolved config and
    the reproducibility record ``environment.json``."""
    (run_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    config.out = str(run_dir)
    save_config(config, run_dir / CONFIG_FILE)
    if environment is not None:
        write_json(run_dir / ENVIRONMENT_FILE, environment)
    return config


# ---- the epochs ---------------------------------------------------------------------------

def fit(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, folder: RunFolder,
        data_hashes: dict, progress: bool) -> None:
    """Epochs until a stopping rule fires or ``epochs`` is reached; Ctrl-C keeps last.ckpt."""
    from crystalscope.evaluation.metrics import classification_metrics

    threads = torch.get_num_threads()
    if cfg.caches_features and data.inputs["train"].dim() == 2 and learner.device.type == "cpu":
        # head-only steps are tiny matmuls: extra threads only add sync cost (10x slower
        # measured with 2 threads on a busy 2-core machine)
        torch.set_num_threads(1)
    restore_rng_states(state.resume_rng)  # a resumed run continues the uninterrupted one's stream
    try:
        while state.epoch < cfg.optimiser.epochs and not state.stopping.should_stop:
            epoch = state.epoch + 1
            with progress_bar(f"epoch {epoch}/{cfg.optimiser.epochs}", total=steps_per_epoch(cfg, data),
                              enabled=progress) as advance:
                on_step, started = counter(advance), time.perf_counter()
                train, train_seconds = train_epoch(cfg, learner, state, data, epoch, on_step)
                val = evaluate_split(cfg, learner, state, data, "val", on_step)
            check_finite(cfg, folder, epoch, train["loss"], val["loss"])
            metrics = classification_metrics(data.splits["val"].labels, val["logits"], data.class_names)
            result = EpochResult(epoch, train, train_seconds, val, metrics,
                                 learner.optimizer.param_groups[0]["lr"], time.perf_counter() - started)
            improved = state.stopping.update(epoch, val["loss"], [s["f1"] for s in metrics["per_class"].values()])
            log_epoch(cfg, folder, data, result, learner.world, improved)
            state.epoch = epoch
            save_checkpoints(cfg, learner, state, data, folder, data_hashes, improved)
    except KeyboardInterrupt:
        log.info(f"interrupted during epoch {state.epoch + 1}: {folder.last} holds epoch {state.epoch}; "
                 f"continue with `crystalscope train --resume {folder.path}`")
        raise
    finally:
        torch.set_num_threads(threads)
    if state.stopping.should_stop:
        log.info(f"stopped after epoch {state.epoch}: {state.stopping.reason}")
    log.info(f"best epoch {state.stopping.best_epoch} (val loss {state.stopping.best_loss:.4f})")


# ---- one run ------------------------------------------------------------------------------

def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train, evaluate and export as described by ``config``; returns a summary dict.

    Example:
        >>> from crystalscope.config import load_config
        >>> cfg = load_config(None, {"data_dir": "split", "backbone": "resnet18", "weights": "none",
        ...                          "image_size": 64, "epochs": 2, "out": "runs/tiny"})
        >>> train(cfg)["test"]["macro"]["f1"]  # doctest: +SKIP
        0.98
    """
    config.validate_values()
    if config.data_dir is None:
        raise CrystalscopeError("train: give DATA_DIR (a folder with train/, val/ and test/)")
    world = distributed.world_from_env()
    if config.runtime.nproc > 1 and not world.enabled:
        return launch_processes(config)
    if world.enabled:
        config.runtime.nproc = world.size  # the saved config states how many processes trained it
    device = distributed.init(world, resolve_device(config.runtime.device))
    with distributed.running(world):
        # rank 0 decides the run folder (next free name) and every rank uses its answer
        run_dir, problem = distributed.from_main(lambda: _decide_run_dir(config), world)
        if problem:
            raise CrystalscopeError(problem)
        # the one output rule: never inside the data; one writer per run folder; stale .tmp removed
        claim = (claim_output(run_dir, inputs=[config.data_dir, config.model.weights_file], kind="folder",
                              command=COMMAND, resume=bool(config.resume))
                 if world.is_main else contextlib.nullcontext())
        with claim:
            try:
                summary = run_training(config, run_dir, progress and world.is_main, world, device)
            finally:
                if world.is_main:
                    record_run(run_dir)
        # every rank leaves together: a rank that tears its process group down while rank 0 still
        # writes the report and ONNX was seen to abort in gloo ("terminate called ...", SIGABRT)
        distributed.barrier(world)
        return summary


def record_run(run_dir: Path) -> None:
    """List the files train wrote (in place, not staged) in the run folder's manifest, so that a
    later ``demo`` or ``--force`` knows they are ours; a run that failed before the folder exists
    leaves nothing.

    Example:
        >>> record_run(Path("runs/train"))  # doctest: +SKIP
    """
    written = [Path(run_dir) / name for name in RECORDED if (Path(run_dir) / name).exists()]
    if written:
        record_files(run_dir, written, COMMAND)


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
        config_yaml = save_config(config, Path(tmp) / CONFIG_FILE)
        distributed.launch(str(config_yaml), config.runtime.nproc, config.out)
    return {"run_dir": config.out, "nproc": config.runtime.nproc}


def check_same_data(run_dir: Path, last: dict | None, hashes: dict[str, str]) -> None:
    """A resumed run must train on the split it started on (content hashes in last.ckpt).

    Raises:
        CrystalscopeError: a split's files differ (added, removed or changed), named.
    """
    if last is None:
        return
    saved = ((last.get("training") or {}).get("data_sha256")) or {}
    changed = [name for name, digest in hashes.items() if name in saved and saved[name] != digest]
    if changed:
        raise CrystalscopeError(f"--resume {run_dir}: the {'/'.join(changed)} split's images changed since the run "
                                "started (files added, removed or edited); resume on the same split, or start a "
                                "new run with --out")


def run_training(config: TrainConfig, run_dir: Path, progress: bool, world: World = World(),
                 device: torch.device | None = None) -> dict:
    """Build the parts once, open the run folder, run the epochs, write the deliverables."""
    device = device if device is not None else resolve_device(config.runtime.device)
    if config.runtime.cuda_graphs and device.type != "cuda":
        raise CrystalscopeError(f"--cuda-graphs: needs a CUDA GPU, and this run's device is {device.type}; "
                                "leave it out (or use --device cuda on a machine with a GPU)")
    folder = RunFolder(run_dir)
    last = distributed.from_main(lambda: load_checkpoint(folder.last), world) if config.resume else None
    # model, weights and data first: a bad backbone, offline weights or an unreadable image
    # fail before the run folder exists, so nothing half-made is left behind
    data = index_data(config, last)
    hashes = {}
    if world.is_main:
        hashes = {name: data_hash(f.root, f.paths) for name, f in data.splits.items()}
        check_same_data(run_dir, last, hashes)
    learner, state = build_learner(config, data, device, world, last)
    if config.caches_features:
        check_cache_memory(config, learner, data)
    data = load_data(config, data, device, world, progress)
    if world.is_main:
        open_run(config, run_dir, environment_record(seed=config.seed, device=device, data_hashes=hashes,
                                                     initial_weights=state.initial_weights,
                                                     weights_source=state.weights_source))
    if config.caches_features:
        data = cache_features(config, learner, state, data, progress)
    fit(config, learner, state, data, folder, hashes, progress)
    return finalize(config, learner, state, data, folder)
