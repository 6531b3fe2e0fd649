"""Embedding maps: CSV rows that match the files, clusters and view cohesion on known points,
one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from crystalscope.cli import app  # noqa: E402
from crystalscope.data.layout import list_images  # noqa: E402
from crystalscope.insight.embedding import cluster_features, project_2d, view_cohesion  # noqa: E402
from pictures import picture_ok  # noqa: E402


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
