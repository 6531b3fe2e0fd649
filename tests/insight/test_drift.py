"""Drift: the threshold and tests on known points, ImageNet or model features on real image sets,
flags that bite, one-line errors, and a drift check that runs without torch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from crystalscope.cli import app  # noqa: E402
from crystalscope.insight.drift import (DriftSettings, drift_report, flag_threshold, held_out_distances,  # noqa: E402
                                        mmd_test)
from crystalscope.insight.features import l2_normalise  # noqa: E402
from pictures import picture_ok  # noqa: E402

SMALL = 96  # ImageNet-feature tests run at 96 px: the 224 px forward is slow on a shared CPU


def test_threshold_interval_and_mmd_statistics():
    held = np.linspace(0, 1, 199)
    threshold, note = flag_threshold(held, 0.01)
    assert note is None and (held > threshold).mean() <= 0.01
    assert flag_threshold(held[:20], 0.01)[1] and "cannot set" in flag_threshold(held[:20], 0.01)[1]
    rng = np.random.default_rng(1)
    same = mmd_test(rng.normal(size=(60, 5)), rng.normal(size=(60, 5)), 300)
    moved = mmd_test(rng.normal(size=(60, 5)), rng.normal(0.8, 1, size=(60, 5)), 300)
    assert same["p_value"] > 0.05 and moved["p_value"] < 0.01 and moved["mmd2"] > same["mmd2"]
    # held-out distances on i.i.d. points: a fresh draw is flagged at about the stated rate
    ref = l2_normalise(rng.normal(size=(400, 8)))
    held_d, _ = held_out_distances(ref, k=10)
    threshold, _ = flag_threshold(held_d, 0.05)
    from crystalscope.insight.drift import knn_distance

    fresh, _ = knn_distance(ref, l2_normalise(rng.normal(size=(2000, 8))), 10)
    assert 0.02 < (fresh > threshold).mean() < 0.08


def test_drift_imagenet_features_generated_foreign_and_shifted(generated, tmp_path):
    """ImageNet features (at 96 px here): fresh generated crops pass, foreign images are flagged,
    blurred and darkened crops are told apart by the two-sample test."""
    names = ["fresh", "uniform", "noise", "text", "photo", "blurred", "darkened"]
    report = drift_report(generated["ref"], [generated[n] for n in names], tmp_path,
                          settings=DriftSettings(false_flag_rate=0.1, permutations=200), image_size=SMALL)
    sets = report["sets"]
    sets["fresh"] = sets.pop("cropped")  # generated/fresh/cropped/cropped
    assert report["reference_groups"]["csv"].endswith("synth_manifest.csv")
    assert report["n_reference"] == 60 and report["threshold_note"] is None
    # new crystals from the same generator: few flags, and the same distribution (one view per crystal)
    assert sets["fresh"]["flagged_fraction"] <= 0.3 and sets["fresh"]["verdict"] == "consistent"
    assert sets["fresh"]["mmd"]["n_new"] < 30 and sets["fresh"]["mmd"]["p_value"] > 0.05
    for name in ("uniform", "noise", "text", "photo"):
        assert sets[name]["flagged_fraction"] >= 0.75, (name, sets[name])
        assert sets[name]["verdict"] == "foreign"
    for name in ("blurred", "darkened"):
        assert sets[name]["mmd"]["p_value"] < 0.05 and sets[name]["verdict"] in ("shifted", "foreign"), name
    assert sets["fresh"]["mmd"]["p_value"] > sets["blurred"]["mmd"]["p_value"]
    rows = list(csv.DictReader((tmp_path / "drift.csv").open()))
    assert len([r for r in rows if r["set"] == "cropped"]) == 30
    assert {r["flagged"] for r in rows if r["set"] == "uniform"} == {"1"}
    picture_ok(tmp_path / "drift.png", (800, 500))
    picture_ok(tmp_path / "drift_foreign.png", (400, 300))
    assert json.loads((tmp_path / "drift.json").read_text())["sets"]["noise"]["n_images"] == 8


def test_drift_cli_reference_against_itself_flags_the_stated_rate(generated, tmp_path):
    result = CliRunner().invoke(app, ["drift", str(generated["ref"]), str(generated["ref"]), "--out", str(tmp_path),
                                      "--rate", "0.1", "--image-size", str(SMALL), "--permutations", "100"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "drift.json").read_text())
    own = summary["sets"]["cropped"]
    # each image is scored against the other reference images, so about 10 % are above the threshold
    assert own["n_images"] == 60 and own["n_flagged"] == summary["reference_held_out"]["flagged"]
    assert 1 <= own["n_flagged"] <= 6 and own["mmd"]["p_value"] > 0.5


def test_drift_with_an_onnx_model_uses_its_features(tiny_model, generated, tmp_path):
    report = drift_report(generated["ref"], [generated["uniform"]], tmp_path, model=tiny_model["onnx"],
                          settings=DriftSettings(permutations=50))
    assert report["features"].startswith("tiny.onnx (onnx)")
    assert report["sets"]["uniform"]["n_images"] == 8
    assert len(list(csv.DictReader((tmp_path / "drift.csv").open()))) == 60 + 8


def test_drift_errors_are_one_line(generated, tmp_path):
    runner = CliRunner()
    cases = [([str(tmp_path / "nope"), str(generated["fresh"])], "REFERENCE"),
             ([str(generated["uniform"]), str(generated["fresh"])], "at least 10"),
             ([str(generated["ref"]), str(generated["fresh"]), "--rate", "2"], "--rate 2"),
             ([str(generated["ref"]), str(tmp_path / "missing")], "no such file or folder")]
    for args, expected in cases:
        result = runner.invoke(app, ["drift", *args, "--out", str(tmp_path / "out"), "--image-size", str(SMALL)])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "drift.json").exists()


NO_TORCH = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Blocked())
from crystalscope.cli import main
sys.argv = ["crystalscope", *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    print("exit", exc.code)
print("leaked", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_onnx_drift_needs_no_torch_and_predict_sheet_no_matplotlib(tiny_model, generated, real_samples, tmp_path):
    """A plant PC with the onnx extra (+ matplotlib for the map) runs drift; the sheet needs Pillow only."""
    runs = [("torch,torchvision,timm,sklearn,scipy",
             ["drift", str(generated["ref"]), str(generated["uniform"]), "--model", str(tiny_model["onnx"]),
              "--out", str(tmp_path / "drift"), "--permutations", "20"]),
            ("torch,torchvision,timm,sklearn,scipy,matplotlib",
             ["predict", str(tiny_model["onnx"]), str(real_samples), "--out", str(tmp_path / "p.csv"),
              "--sheet", str(tmp_path / "sheet.png")])]
    for blocked, args in runs:
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, blocked, *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "COLUMNS": "200"})
        assert "exit 0" in proc.stdout and "leaked []" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["sets"]["uniform"]["n_images"] == 8
    picture_ok(tmp_path / "sheet.png", (8 * 160, 160))
