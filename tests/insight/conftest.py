"""Fixtures shared by the insight tests (embed, drift): a tiny model and small image sets.

Session-scoped so that the embedding and drift modules build them once between them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_bench
from tiny_onnx import untrained_model_files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """Untrained resnet18 at 48 px, as .ckpt and .onnx (with the features output)."""
    pytest.importorskip("onnxruntime")
    return untrained_model_files(tmp_path_factory.mktemp("insight-model"))


@pytest.fixture(scope="session")
def lines_and_discs(tmp_path_factory) -> Path:
    from lines_and_discs import make_split

    return make_split(tmp_path_factory.mktemp("insight-data") / "split",
                      counts={"train": (2, 2), "val": (2, 2), "test": (12, 10)})


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> dict[str, Path]:
    """Generated crops: a reference (seed 0), fresh crops of new crystals (seed 1) and the probe sets."""
    from crystalscope.data.synth import generate

    root = tmp_path_factory.mktemp("insight-synth")
    generate(root / "ref", per_class=30, seed=0, workers=1, progress=False)
    generate(root / "fresh", per_class=15, seed=1, workers=1, progress=False)
    probes = load_bench("drift_check").write_probe_sets(root / "fresh" / "cropped" / "cropped", root / "probes", per_set=8)
    return {"ref": root / "ref" / "cropped" / "cropped", "fresh": root / "fresh" / "cropped" / "cropped",
            "manifest": root / "ref" / "synth_manifest.csv", **probes}
