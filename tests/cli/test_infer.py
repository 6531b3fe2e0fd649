"""cli/infer.py: evaluate, export, predict, ood-eval and merge at the command line (bad input, help,
predict's table and its all-unreadable exit, merge's summary)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from cli_checks import error_line, help_text, invoke, tiny_checkpoint
from PIL import Image


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("command, options", [
    ("evaluate", ["--out", "--batch-size", "--device", "--workers", "--force"]),
    ("export", ["--out", "--opset", "--check-images", "--atol"]),
    ("predict", ["--out", "--batch-size", "--recursive", "--device", "--sheet", "--reject", "--resume", "--shard"]),
    ("ood-eval", ["--report", "--batch-size", "--device"]),
    ("merge", ["--out"]),
])
def test_help_lists_the_key_options(command, options):
    text = help_text(command)
    assert [option for option in options if option not in text] == []


def test_evaluate_a_missing_checkpoint_names_it(tmp_path):
    (tmp_path / "data").mkdir()
    line = error_line(invoke("evaluate", tmp_path / "gone.ckpt", tmp_path / "data", "--out", tmp_path / "report"))
    assert "gone.ckpt" in line and "not found" in line
    assert not (tmp_path / "report").exists()


def test_export_of_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello")
    line = error_line(invoke("export", tmp_path / "notes.ckpt", "--out", tmp_path / "m.onnx"))
    assert "notes.ckpt: not a readable crystalscope checkpoint" in line
    assert not (tmp_path / "m.onnx").exists()


def test_predict_with_a_missing_model_names_it(tmp_path):
    (tmp_path / "images").mkdir()
    line = error_line(invoke("predict", tmp_path / "gone.onnx", tmp_path / "images", "--out", tmp_path / "p.csv"))
    assert "gone.onnx" in line and "not found" in line


def test_ood_eval_with_a_missing_model_names_it(tmp_path):
    line = error_line(invoke("ood-eval", tmp_path / "gone.onnx", tmp_path / "in", tmp_path / "out"))
    assert "gone.onnx" in line and "not found" in line


def test_predict_renders_the_table_and_writes_a_row_per_file(tiny_ckpt, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"crop {i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    result = invoke("predict", tiny_ckpt, images, "--out", out, "--device", "cpu", "--show", "2")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows) == 3
    assert "tiny.ckpt (torch)" in result.output and "... 2 more rows in" in result.output
    assert "4 images: " in result.output and "errors: 1" in result.output


def test_predict_exits_1_when_no_file_is_an_image(tiny_ckpt, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"nope")
    (images / "b.jpg").write_bytes(b"nope")
    line = error_line(invoke("predict", tiny_ckpt, images, "--out", tmp_path / "p.csv", "--device", "cpu"), code=1)
    assert line == f"error: none of the 2 files could be read as an image (reasons in {tmp_path / 'p.csv'})"


def shard_csvs(tmp_path, names=("x.png", "y.png", "z.png", "w.png"), count=2) -> list:
    """Shard CSVs of one campaign as predict writes them: rows of their shard, a provenance file each."""
    from crystalscope.inference.provenance import write_provenance
    from crystalscope.inference.stream import in_shard

    model = tmp_path / "m.onnx"
    model.write_bytes(b"weights")
    parts = []
    for index in range(count):
        part = tmp_path / f"part{index}.csv"
        rows = [n for n in names if in_shard(n, (index, count))]
        part.write_text("path,predicted\n" + "".join(f"{n},cex\n" for n in rows))
        write_provenance(part, {"format": "crystalscope-predictions/1", "model_sha256": "abc", "class_names": ["cex"],
                                "inputs": ["/crops"], "recursive": True, "reject": True, "shard": f"{index}/{count}"})
        parts.append(part)
    return parts


def test_merge_joins_the_shards_and_says_how_many_rows(tmp_path):
    parts = shard_csvs(tmp_path)
    result = invoke("merge", *parts, "--out", tmp_path / "all.csv")
    assert result.exit_code == 0, result.output
    assert f"4 rows from 2 shard CSVs -> {tmp_path / 'all.csv'}" in result.output
    lines = (tmp_path / "all.csv").read_text().splitlines()
    assert lines[0] == "path,predicted" and sorted(lines[1:]) == ["w.png,cex", "x.png,cex", "y.png,cex", "z.png,cex"]
    merged = json.loads((tmp_path / "all.csv.json").read_text())
    assert merged["shard"] is None and merged["missing_shards"] == [] and merged["model_sha256"] == "abc"


def test_merge_of_a_missing_shard_names_it_and_writes_nothing(tmp_path):
    (tmp_path / "a.csv").write_text("path,predicted\nx.png,cex\n")
    line = error_line(invoke("merge", tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "all.csv"))
    assert line == f"error: merge: {tmp_path / 'b.csv'}: no such file"
    assert not (tmp_path / "all.csv").exists()
