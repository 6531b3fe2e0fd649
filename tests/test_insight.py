"""Embedding maps, picture sheets and drift: real images, rows that match the files, flags that bite."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from crystalscope.cli import app  # noqa: E402
from crystalscope.data.images import list_images  # noqa: E402
from crystalscope.data.synth import generate  # noqa: E402
from crystalscope.data.transforms import Preprocessing  # noqa: E402
from crystalscope.evaluation.sheets import COLOURS, prediction_sheet  # noqa: E402
from crystalscope.export.onnx import export_checkpoint  # noqa: E402
from crystalscope.inference.predictor import Prediction  # noqa: E402
from crystalscope.insight.drift import (DriftSettings, drift_report, flag_threshold, held_out_distances,  # noqa: E402
                                        mmd_test, wilson_interval)
from crystalscope.insight.embedding import cluster_features, project_2d, view_cohesion  # noqa: E402
from crystalscope.insight.features import l2_normalise  # noqa: E402
from crystalscope.models.factory import HeadSpec, build_model  # noqa: E402
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from lines_and_discs import make_split  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = 96  # ImageNet-feature tests run at 96 px: the 224 px forward is slow on a shared CPU


def load_drift_check():
    spec = importlib.util.spec_from_file_location("drift_check", BENCH / "drift_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def picture_ok(path: Path, min_size=(300, 200)) -> np.ndarray:
    """A real PNG of at least ``min_size`` with varied pixels; returns its pixels."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return pixels


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """Untrained resnet18 at 48 px, as .ckpt and .onnx (with the features output)."""
    root = tmp_path_factory.mktemp("insight-model")
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=1.0, preprocessing=Preprocessing(image_size=48))
    path = save_checkpoint(ckpt, root / "tiny.ckpt")
    return {"ckpt": path, "onnx": Path(export_checkpoint(path, root / "tiny.onnx")["path"])}


@pytest.fixture(scope="module")
def lines_and_discs(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("insight-data") / "split",
                      counts={"train": (2, 2), "val": (2, 2), "test": (12, 10)})


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """Generated crops: a reference (seed 0), fresh crops of new crystals (seed 1) and the probe sets."""
    root = tmp_path_factory.mktemp("insight-synth")
    generate(root / "ref", per_class=30, seed=0, workers=1, progress=False)
    generate(root / "fresh", per_class=15, seed=1, workers=1, progress=False)
    probes = load_drift_check().write_probe_sets(root / "fresh" / "cropped" / "cropped", root / "probes", per_set=8)
    return {"ref": root / "ref" / "cropped" / "cropped", "fresh": root / "fresh" / "cropped" / "cropped",
            "manifest": root / "ref" / "synth_manifest.csv", **probes}


# ---- embed ---------------------------------------------------------------------------------


def test_embed_cli_writes_map_and_csv_rows_matching_the_files(tiny_model, lines_and_discs, tmp_path):
    folder = lines_and_discs / "test"
    result = CliRunner().invoke(app, ["embed", str(tiny_model["onnx"]), str(folder), "--out", str(tmp_path),
                                      "--clusters", "3", "--per-cluster", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "embedding.csv").open()))
    assert list(rows[0]) == ["path", "true", "predicted", "cluster", "x", "y"]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in list_images(folder))
    for row in rows:
        assert row["true"] == Path(row["path"]).parent.name.lower()  # class folder CEX -> cex
        assert row["predicted"] in ("cex", "pg") and row["cluster"] in ("0", "1", "2")
        assert math.isfinite(float(row["x"])) and math.isfinite(float(row["y"]))
    assert len({r["cluster"] for r in rows}) == 3
    assert np.std([float(r["x"]) for r in rows]) > 0  # a real spread, not a point
    picture_ok(tmp_path / "embedding.png", (800, 500))
    summary = json.loads((tmp_path / "embedding.json").read_text())
    assert summary["clusters"]["k"] == 3 and summary["clusters"]["chosen_by"] == "given"
    assert sum(c["n"] for c in summary["clusters"]["composition"]) == len(rows) == 22
    assert 0 < summary["projection"]["explained"][1] <= summary["projection"]["explained"][0] < 1


def test_embed_without_class_folders_and_with_groups(tiny_model, generated, tmp_path):
    """Files straight in the folder: no true class; a groups CSV measures view cohesion."""
    from crystalscope.insight.embedding import embed_folder

    summary = embed_folder(tiny_model["ckpt"], generated["ref"] / "pg", tmp_path, groups_csv=generated["manifest"])
    rows = list(csv.DictReader((tmp_path / "embedding.csv").open()))
    assert len(rows) == 30 and {r["true"] for r in rows} == {""}
    assert 2 <= summary["clusters"]["k"] <= 8 and summary["clusters"]["silhouette"]
    cohesion = summary["view_cohesion"]["features"]
    assert cohesion["n_images_in_groups"] == 30 and cohesion["n_groups"] >= 6
    assert 0 <= cohesion["nearest_same_group"] <= 1 and cohesion["within_group_mean"] >= 0


def test_view_cohesion_and_clusters_on_known_points():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 4))
    points = np.repeat(centres, 4, axis=0) + rng.normal(0, 0.1, (20, 4))
    groups = [f"g{i // 4}" for i in range(20)]
    tight = view_cohesion(points, groups, "euclidean")
    assert tight["nearest_same_group"] == 1.0 and tight["ratio"] < 0.1
    assert tight["nearest_same_group_chance"] == pytest.approx(3 / 19)
    shuffled = view_cohesion(points, list(rng.permutation(groups)), "euclidean")
    assert shuffled["ratio"] > 0.3 and shuffled["nearest_same_group"] < 0.5
    assert view_cohesion(points, [""] * 20) is None
    assert cluster_features(points)["k"] == 5
    mapped = project_2d(points)
    assert mapped.coords.shape == (20, 2) and sum(mapped.explained) <= 1.0


def test_embed_errors_are_one_line(tiny_model, lines_and_discs, tmp_path):
    runner = CliRunner()
    cases = [(["embed", str(tiny_model["onnx"]), str(tmp_path / "nope")], "folder not found"),
             (["embed", str(tiny_model["onnx"]), str(lines_and_discs / "test"), "--clusters", "500"], "--clusters 500"),
             (["embed", str(tiny_model["onnx"]), str(lines_and_discs / "test"), "--projection", "tsne"], "--projection"),
             (["embed", str(tiny_model["onnx"]), str(lines_and_discs / "test"), "--projection", "umap"], "umap")]
    for args, expected in cases:
        result = runner.invoke(app, args + ["--out", str(tmp_path / "out")])
        assert result.exit_code != 0 and expected in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "embedding.csv").exists()


# ---- picture sheets ------------------------------------------------------------------------


def test_predict_sheet_draws_every_image_and_the_rejected_flag(tiny_model, real_samples, tmp_path):
    sheet = tmp_path / "predictions.png"
    result = CliRunner().invoke(app, ["predict", str(tiny_model["onnx"]), str(real_samples), "--out",
                                      str(tmp_path / "p.csv"), "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    pixels = picture_ok(sheet, (8 * 160, 160))  # 8 images in one row of 160 px cells
    assert tuple(pixels[80, 2]) == COLOURS["ok"]  # accepted: green frame (below the title)
    rows = [Prediction("a.png", "pg", 0.9, {"cex": 0.1, "pg": 0.9}, status="rejected (score 12.3 > 4.5)"),
            Prediction(str(sorted(real_samples.glob("*.png"))[0]), "cex", 0.8, {"cex": 0.8, "pg": 0.2}),
            Prediction("gone.png", status="error: file not found")]
    drawn = np.asarray(prediction_sheet(rows, tmp_path / "flags.png"))
    assert tuple(drawn[20, 2]) == COLOURS["rejected"] and tuple(drawn[20, 162]) == COLOURS["ok"]
    assert tuple(drawn[20, 322]) == COLOURS["error"]
    # capped: the rejected and unreadable rows come first
    capped = np.asarray(prediction_sheet(rows[::-1], tmp_path / "capped.png", limit=2))
    assert capped.shape[1] == 2 * 160
    assert {tuple(capped[60, 2]), tuple(capped[60, 162])} == {COLOURS["rejected"], COLOURS["error"]}


def test_predict_sheet_bad_name_is_a_one_line_error(tiny_model, real_samples, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tiny_model["onnx"]), str(real_samples), "--out",
                                      str(tmp_path / "p.csv"), "--sheet", str(tmp_path / "sheet.jpg")])
    assert result.exit_code == 2 and "--sheet" in result.output and ".png" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_report_writes_misclassified_sheet(real_samples, tmp_path):
    from crystalscope.evaluation.report import write_test_report

    files = sorted(real_samples.glob("*.png"))[:6]
    y_true = np.array([0, 0, 0, 1, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.0, 2.0]])
    write_test_report(tmp_path, y_true=y_true, logits=logits, class_names=["cex", "pg"], positive_class="pg",
                      paths=[str(f) for f in files])
    pixels = picture_ok(tmp_path / "misclassified.png", (320, 160))
    assert pixels.shape[1] == 2 * 160  # the two wrong images, side by side
    assert tuple(pixels[40, 2]) == COLOURS["wrong"]


# ---- drift ---------------------------------------------------------------------------------


def test_threshold_interval_and_mmd_statistics():
    held = np.linspace(0, 1, 199)
    threshold, note = flag_threshold(held, 0.01)
    assert note is None and (held > threshold).mean() <= 0.01
    assert flag_threshold(held[:20], 0.01)[1] and "cannot set" in flag_threshold(held[:20], 0.01)[1]
    low, high = wilson_interval(5, 100)
    assert low < 0.05 < high and 0 < low and high < 0.12
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
