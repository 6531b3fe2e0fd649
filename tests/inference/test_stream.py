"""Campaign-scale predict: sharding covers each file once, resume equals an uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data.transforms import Preprocessing
from crystalscope.inference.stream import predict_paths
from crystalscope.inference.predictor import Prediction
from crystalscope.inference.stream import SheetRows, in_shard, iter_files, parse_shard, predict_stream
from crystalscope.errors import CrystalscopeError
from close_rows import assert_rows_close
from crystalscope.models.factory import HeadSpec, build_model
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_model("resnet18", 2).eval()
    with torch.no_grad():
        net.head[-1].weight.mul_(40.0)  # spread the untrained logits so rows differ
    ckpt = make_checkpoint(net, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=1.0, preprocessing=Preprocessing(image_size=32))
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("model") / "tiny.ckpt")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    """37 small PNGs in nested folders, one unreadable .png and one hidden file."""
    root = tmp_path_factory.mktemp("campaign")
    rng = np.random.default_rng(0)
    for i in range(37):
        folder = root / f"plate{i % 3}" / ("wells" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"frame ({i}).png")
    (root / "plate0" / "broken.png").write_bytes(b"not a png")
    (root / "plate1" / ".hidden.png").write_bytes(b"x")
    return root


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_listing_is_lazy_and_matches_the_in_memory_predict(model, campaign, tmp_path):
    files = iter_files([campaign])
    assert iter(files) is files  # a generator: nothing is listed before it is asked for
    listed = list(files)
    assert len(listed) == 38 and not any(p.name.startswith(".") for p in listed)
    streamed = predict_stream(model, [campaign], tmp_path / "s.csv", batch_size=4, chunk=5, device="cpu")
    whole = predict_paths(model, [campaign], tmp_path / "w.csv", batch_size=4, progress=False, device="cpu")
    assert streamed.n_images == whole.n_images == 38 and streamed.n_errors == 1
    assert streamed.n_ok + streamed.n_rejected == 37 and sum(streamed.counts.values()) == streamed.n_ok
    assert len(streamed.predictions) == 20 and len(whole.predictions) == 38  # keep=20 by default
    # other chunks split the batches otherwise: the same rows, probabilities within float noise
    assert_rows_close(rows(tmp_path / "s.csv"), rows(tmp_path / "w.csv"), atol=1e-5)


def test_listing_gives_each_file_once_however_the_paths_overlap(tmp_path):
    """As the in-memory listing did: a folder given twice, a file inside a given folder, a
    sub-folder given beside its parent; without --recursive a given sub-folder is still listed."""
    (tmp_path / "crops" / "sub").mkdir(parents=True)
    for name in ("crops/a.png", "crops/sub/b.png", "crops/.c.png", "crops/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    crops, sub = tmp_path / "crops", tmp_path / "crops" / "sub"

    def names(paths, recursive=True):
        return [p.relative_to(tmp_path).as_posix() for p in iter_files(paths, recursive)]

    assert names([crops, crops]) == ["crops/a.png", "crops/sub/b.png"]
    assert names([sub / "b.png", crops, crops / "a.png"]) == ["crops/a.png", "crops/sub/b.png"]
    assert names([sub, crops]) == ["crops/a.png", "crops/sub/b.png"]
    assert names([crops, sub], recursive=False) == ["crops/a.png", "crops/sub/b.png"]
    assert names([sub / "b.png", crops], recursive=False) == ["crops/sub/b.png", "crops/a.png"]
    # given by name, a file the walk skips (hidden, not an image extension) still gets its row, once
    assert names([crops, crops / ".c.png", crops / "notes.txt", crops / "notes.txt"]) == [
        "crops/a.png", "crops/sub/b.png", "crops/.c.png", "crops/notes.txt"]


def test_shards_cover_every_file_exactly_once_and_merge_joins_them(model, campaign, tmp_path):
    runner = CliRunner()
    for i in range(2):
        result = runner.invoke(app, ["predict", str(model), str(campaign), "--out", str(tmp_path / f"part{i}.csv"),
                                     "--shard", f"{i}/2", "--device", "cpu", "--show", "0"])
        assert result.exit_code == 0, result.output
    parts = [[r["path"] for r in rows(tmp_path / f"part{i}.csv")] for i in range(2)]
    every = [str(p) for p in iter_files([campaign])]
    assert parts[0] and parts[1], "a 38-file campaign should put files in both shards"
    assert sorted(parts[0] + parts[1]) == sorted(every)  # each file once: no gap, no overlap
    assert all(in_shard(p, (0, 2)) for p in parts[0])
    result = runner.invoke(app, ["merge", str(tmp_path / "part0.csv"), str(tmp_path / "part1.csv"),
                                 "--out", str(tmp_path / "all.csv")])
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows(tmp_path / "all.csv")] == parts[0] + parts[1]


def test_resume_after_an_interruption_gives_the_uninterrupted_csv(model, campaign, tmp_path):
    whole = tmp_path / "whole.csv"
    predict_stream(model, [campaign], whole, batch_size=4, chunk=6, device="cpu")
    out = tmp_path / "resumed.csv"
    done = []

    def interrupt(n_done, total):
        assert total is None  # files are listed lazily: no total
        done.append(n_done)
        if len(done) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second appended block

    with pytest.raises(KeyboardInterrupt):
        predict_stream(model, [campaign], out, batch_size=4, chunk=6, device="cpu", resume=True, on_progress=interrupt)
    assert len(rows(out)) == 12 and done == [6, 12]
    with open(out, "a") as handle:
        handle.write(f"{campaign}/plate0/frame (0).png,pg,0.5")  # a row cut short by a kill -9
    summary = predict_stream(model, [campaign], out, batch_size=4, chunk=6, device="cpu", resume=True)
    assert summary.n_skipped == 12 and summary.n_images == 38 - 12
    assert out.read_bytes() == whole.read_bytes()
    again = predict_stream(model, [campaign], out, batch_size=4, chunk=6, device="cpu", resume=True)
    assert again.n_images == 0 and out.read_bytes() == whole.read_bytes()


def test_resume_refuses_a_csv_with_other_columns_and_bad_shards(model, campaign, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("path,predicted,confidence,p_a,p_b,p_c,status\nx.png,a,1,1,0,0,ok\n")
    before = other.read_bytes()
    result = CliRunner().invoke(app, ["predict", str(model), str(campaign), "--out", str(other), "--resume",
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "other.csv.json" in result.output and "Traceback" not in result.output
    assert other.read_bytes() == before  # never appended to, never truncated
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(CrystalscopeError, match="--shard"):
            parse_shard(bad)


def test_sheet_rows_keep_the_rows_the_sheet_shows_in_bounded_memory():
    """predict --sheet while streaming: at most ``limit`` rows held, the rejected, unreadable and
    least confident of all the chunks seen (what the sheet would pick from every row)."""
    confidences = [0.99, 0.6, 0.95, 0.7, 0.9, 0.55, 0.97, 0.8]
    every = [Prediction(f"{i}.png", "cex", c, {"cex": c, "pg": 1 - c}) for i, c in enumerate(confidences)]
    every[6].status = "rejected"
    every.append(Prediction("gone.png", status="error: file not found"))
    kept = SheetRows(limit=3)
    for start in range(0, len(every), 2):
        kept.add(every[start:start + 2])
        assert len(kept.rows) <= 3
    assert kept.total == 9
    assert [p.path for p in kept.rows] == ["gone.png", "6.png", "5.png"]
