"""Smoke tests of the benchmark scripts and the --cache-frozen CPU path, at 32 px / a dozen images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import BENCH, load_bench
from lines_and_discs import make_split


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    """Lines (cex) vs discs (pg), 32 px, 6+6 train, 3+3 val, 3+3 test."""
    return make_split(tmp_path_factory.mktemp("bench") / "split", counts={"train": (6, 6), "val": (3, 3),
                                                                            "test": (3, 3)}, size=32)


def test_bench_train_cache_frozen_writes_json_and_report_renders_it(tiny_split, tmp_path):
    bench_train, report = load_bench("bench_train"), load_bench("report")
    results = tmp_path / "results"
    assert bench_train.main([str(tiny_split), "--name", "tiny-frozen", "--results", str(results),
                             "--runs", str(tmp_path / "runs"),
                             "--set", "backbone=resnet18", "--set", "weights=none", "--set", "image_size=32",
                             "--set", "trainable_fraction=0.1", "--set", "cache_frozen=true",
                             "--set", "feature_passes=2", "--set", "epochs=2", "--set", "batch_size=8",
                             "--set", "lr=0.01", "--set", "onnx=false", "--set", f"cache_dir={tmp_path / 'c'}",
                             "--f1-targets", "0.0"]) == 0
    record = json.loads((results / "tiny-frozen.json").read_text())
    assert record["epochs_run"] == 2 and len(record["epochs"]) == 2
    assert record["epochs"][0]["train_images"] == 24  # 12 images x 2 feature passes
    assert record["epochs_to_target"] == {"0.0": 1}  # every F1 >= 0 after the first epoch
    assert record["phases_s"]["features"] > 0 and record["peak_rss_mib"] > 50
    assert 0.0 <= record["test_macro_f1"] <= 1.0
    assert (Path(record["run_dir"]) / "weights" / "best.ckpt").is_file()
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- BEGIN train -->\nold\n<!-- END train -->\nkeep\n")
    assert report.main([str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "keep" in text and "tiny-frozen" in text
    assert "cached frozen part, last 0.1 trained, 2 passes" in text
    assert "--set cache_frozen=true --set feature_passes=2" in text  # the exact command


def test_report_ratio_uses_the_perf_ceiling():
    report = load_bench("report")
    cfg = {"device": "cuda", "backbone": "resnet101", "image_size": 224, "batch_size": 64, "compile": True,
           "compile_mode": "reduce-overhead"}
    assert report.ceiling_for(cfg) == 3517
    # the goal is 80 % of the best figure at the batch size, whatever the mode (PERF.md)
    assert report.ceiling_for({**cfg, "compile": False}) == 3517
    assert report.ceiling_for({**cfg, "compile": False}, same_mode=True) == 1400
    assert report.ceiling_for({**cfg, "compile": False, "cuda_graphs": True}, same_mode=True) == 3517
    assert report.ceiling_for({**cfg, "batch_size": 128}) == 2668
    assert report.ceiling_for({**cfg, "device": "cpu"}) is None
    row = report.train_table([{"name": "eager", "config": {**cfg, "compile": False, "lr": 0.1, "weights": "none",
                                                           "trainable_fraction": 0.1},
                               "epochs": [], "train_img_s_after_first": 1300.0, "epochs_run": 5,
                               "whole_run_s": 50.0, "test_macro_f1": 0.99, "peak_rss_mib": 1.0}])
    assert "| 37% of 3,517 (93% of this mode's 1,400) |" in row
    record = {"command": "python benchmarks/bench_train.py /d --name n --set backbone=resnet101 --set compile=true "
                         "--set compile_mode=reduce-overhead --set out=/tmp/x"}
    assert report.cli_equivalent(record) == ("crystalscope train /d --backbone resnet101 --compile "
                                             "--compile-mode reduce-overhead")
    record["command"] += " --set momentum=0.8"
    assert report.cli_equivalent(record).endswith("--config C.yaml  (C.yaml: momentum: 0.8)")


def test_a_run_stopped_after_its_epochs_leaves_a_partial_result(tiny_split, tmp_path, monkeypatch):
    bench_train, report = load_bench("bench_train"), load_bench("report")
    from crystalscope.training import run

    def killed(*parts):  # e.g. the device tool's time limit, after the epochs
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "finalize", killed)
    results = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main([str(tiny_split), "--name", "stopped", "--results", str(results), "--runs",
                          str(tmp_path / "runs"), "--set", "backbone=resnet18", "--set", "weights=none",
                          "--set", "image_size=32", "--set", "epochs=2", "--set", "batch_size=4",
                          "--set", "onnx=false", "--f1-targets", "0.0"])
    record = json.loads((results / "stopped.json").read_text())
    assert record["partial"] is True and [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["epochs"][1]["train_images"] == 12 and record["time_to_target_s"]["0.0"] > 0
    table = report.train_table([record])
    assert "| stopped (stopped: partial) |" in table and "| 2 |" in table


def test_bench_infer_measures_both_back_ends(tiny_split, tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_infer.py"), "--backbone", "resnet18", "--image-size", "32",
         "--images", str(tiny_split / "test"), "--batch-sizes", "1,4", "--n-model", "8", "--repeats", "1",
         "--threads", "1", "--name", "tiny-infer", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "tiny-infer.json").read_text())
    kinds = {(r["backend"], r["mode"], r["batch_size"]) for r in record["rows"]}
    assert {("pytorch", "model", 4), ("onnxruntime", "model", 4), ("onnxruntime", "files", 32),
            ("pytorch", "training-eval", 1)} <= kinds
    assert all(r["img_s"] > 0 for r in record["rows"])
    assert record["onnx_max_abs_diff"] < 1e-4 and record["n_files"] == 6
    assert "bench_infer.py --backbone resnet18" in record["command"]


def test_predict_pipeline_measures_graph_and_end_to_end_in_one_run(tmp_path):
    from fitted_model import write_fitted_model
    from PIL import Image

    bench = load_bench("predict_pipeline")
    model = write_fitted_model(tmp_path / "model.onnx")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / f"{i}.png")
    results = tmp_path / "results"
    assert bench.main([str(model), str(images), "--repeats", "1", "--name", "tiny", "--results", str(results)]) == 0
    record = json.loads((results / "tiny.json").read_text())
    assert record["n_images"] == 6 and record["rows"]["rejection_fitted"] is True
    for key in ("graph", "graph_no_reject", "end_to_end", "end_to_end_no_reject"):
        assert record["rows"][key]["median"] > 0
    assert record["end_to_end_over_graph"] > 0 and "rejection_adds" in record
