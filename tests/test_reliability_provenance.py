"""Attacks on provenance: rows of two models, inputs or option sets never end up in one CSV.

predict --resume after a change, merge of mixed or repeated shards, predict to stdout, and
train --resume on another split or with a changed recipe. Each attack is a real command
(``tests/attacks.py``); the files a user had before it must be byte-identical after it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import onnx
import pytest

from attacks import FIXES, check_attack, check_attack_process
from crystalscope.inference.stream import in_shard
from lines_and_discs import make_split

pytest.importorskip("onnxruntime")

FIXES.extend([
    ("resume mixes two runs", "`predict --resume` checked only the CSV's header",
     "`<csv>.json` provenance (model sha256, classes, inputs, recursive, reject, shard; "
     "`inference.provenance`), compared by `check_resume` before any row is appended"),
    ("merge mixes or repeats shards", "`merge` concatenated whatever it was given",
     "`check_shards` (same provenance, one N, each I once, none missing unless `--allow-partial`), "
     "same file refused by device+inode, each row in its own shard and once"),
    ("CSV to stdout", "`--out -` was a file named `-`, and the atomic rename replaced `/dev/stdout`",
     "`predict --out -` streams rows to standard output; the table and logs go to stderr"),
    ("train --resume on other data or recipe", "the saved config was overridden silently",
     "`config_for_resume` refuses any override but `--epochs` and the stopping options; "
     "`check_same_data` compares the splits' content hashes in last.ckpt before any work"),
])


def predict(model, inputs, out, *extra):
    return ["predict", model, *inputs, "--out", out, "--device", "cpu", *extra]


@pytest.fixture
def campaign(assets, tmp_path) -> dict:
    """A user's first predictions CSV (with its provenance) and a second model of the same classes."""
    out = tmp_path / "p.csv"
    check_attack("predict a folder (the first run of a campaign)", predict(assets["onnx"], [assets["images"]], out),
                 code=0, roots=(assets["root"],))
    other = tmp_path / "other.onnx"
    model = onnx.load(str(assets["onnx"]))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "note": "retrained"})
    onnx.save(model, str(other))
    return {"csv": out, "other_model": other, "root": tmp_path}


# ---- predict --resume ------------------------------------------------------------------------

@pytest.mark.parametrize("change,words", [
    ("another model", ("the model",)),
    ("another input folder", ("the input paths",)),
    ("--no-reject", ("--reject/--no-reject",)),
    ("--shard 0/2", ("--shard",)),
    ("--no-recursive", ("--recursive",)),
])
def test_resume_refuses_a_csv_made_otherwise(assets, campaign, change, words):
    model, inputs, extra = assets["onnx"], [assets["images"]], []
    if change == "another model":
        model = campaign["other_model"]
    elif change == "another input folder":
        inputs = [assets["split"] / "test" / "PG"]
    else:
        extra = change.split()
    check_attack(f"predict --resume after changing {change}", predict(model, inputs, campaign["csv"], "--resume", *extra),
                 code=2, words=("--resume", "other settings", *words), roots=(assets["root"], campaign["root"]))


def test_resume_with_the_same_settings_continues(assets, campaign):
    result = check_attack("predict --resume with the same model, inputs and options",
                          predict(assets["onnx"], [assets["images"]], campaign["csv"], "--resume"), code=0,
                          roots=(assets["root"],))
    assert "resumed: 4 files" in result.output
    assert len(list(csv.DictReader(campaign["csv"].open()))) == 4  # nothing appended twice


@pytest.mark.parametrize("sidecar", ["missing", "not JSON", "another format"])
def test_resume_refuses_a_csv_whose_provenance_is_unknown(assets, campaign, sidecar):
    record = campaign["csv"].with_name("p.csv.json")
    if sidecar == "missing":
        record.unlink()
    else:
        record.write_text("{oops" if sidecar == "not JSON" else json.dumps({"format": "something-else/9"}))
    check_attack(f"predict --resume onto a CSV whose .json is {sidecar}",
                 predict(assets["onnx"], [assets["images"]], campaign["csv"], "--resume"), code=2,
                 words=("--resume", "p.csv", "new --out"), roots=(assets["root"], campaign["root"]))


def test_a_fresh_run_replaces_the_csv_and_its_provenance_together(assets, campaign):
    check_attack("predict again into the same --out with another model (no --resume)",
                 predict(campaign["other_model"], [assets["images"]], campaign["csv"]), code=0, roots=(assets["root"],))
    record = json.loads(campaign["csv"].with_name("p.csv.json").read_text())
    assert record["model"] == str(campaign["other_model"]) and record["reject"] is True


# ---- merge -----------------------------------------------------------------------------------

@pytest.fixture
def shards(assets, tmp_path) -> dict:
    # the whole split (32 images): shards hash the path, and a shard of a few files could be empty
    parts = {}
    for index in range(2):
        parts[index] = tmp_path / f"part{index}.csv"
        check_attack(f"predict --shard {index}/2", predict(assets["onnx"], [assets["split"]], parts[index],
                                                           "--shard", f"{index}/2"), code=0, roots=(assets["root"],))
    return {"parts": parts, "root": tmp_path}


def test_merge_of_every_shard_gives_each_image_once(assets, shards):
    out = shards["root"] / "all.csv"
    check_attack("merge both shards", ["merge", shards["parts"][0], shards["parts"][1], "--out", out], code=0,
                 words=("32 rows from 2 shard CSVs",), roots=(assets["root"], shards["root"]))
    paths = [r["path"] for r in csv.DictReader(out.open())]
    assert len(paths) == len(set(paths)) == 32
    assert json.loads(out.with_name("all.csv.json").read_text())["shard"] is None


def test_merge_refuses_a_shard_given_twice(assets, shards):
    part = shards["parts"][0]
    link = shards["root"] / "again.csv"
    link.symlink_to(part)
    for name, second in (("the same path", part), ("a link to it", link)):
        check_attack(f"merge a shard twice ({name})", ["merge", part, second, "--out", shards["root"] / "all.csv"],
                     code=2, words=("same file", "once"), roots=(assets["root"], shards["root"]))
    assert not (shards["root"] / "all.csv").exists()


def test_merge_refuses_a_missing_shard_unless_partial_is_allowed(assets, shards):
    out = shards["root"] / "all.csv"
    check_attack("merge 1 of 2 shards", ["merge", shards["parts"][0], "--out", out], code=2,
                 words=("shard 1/2 missing", "--allow-partial"), roots=(assets["root"], shards["root"]))
    check_attack("merge 1 of 2 shards with --allow-partial", ["merge", shards["parts"][0], "--out", out,
                                                             "--allow-partial"],
                 code=0, words=("partial: shard 1/2 missing",), roots=(assets["root"], shards["root"]))
    assert json.loads(out.with_name("all.csv.json").read_text())["missing_shards"] == ["1/2"]


def test_merge_refuses_shards_of_two_models_or_options(assets, shards, campaign):
    root = shards["root"]
    for change, extra, model in (("another model", [], campaign["other_model"]),
                                 ("--no-reject", ["--no-reject"], assets["onnx"])):
        other = root / f"other-{extra and 'noreject' or 'model'}.csv"
        check_attack(f"predict shard 1/2 with {change}", predict(model, [assets["split"]], other,
                                                                  "--shard", "1/2", *extra), code=0,
                     roots=(assets["root"],))
        check_attack(f"merge shards predicted with {change}", ["merge", shards["parts"][0], other, "--out",
                                                                 root / "all.csv"],
                     code=2, words=("predicted differently",), roots=(assets["root"], root))


def test_merge_refuses_two_parts_of_one_shard_and_shards_of_other_counts(assets, shards):
    root = shards["root"]
    copy = root / "copy0.csv"
    shutil.copy(shards["parts"][0], copy)
    shutil.copy(shards["parts"][0].with_name("part0.csv.json"), root / "copy0.csv.json")
    check_attack("merge two copies of shard 0/2", ["merge", shards["parts"][0], copy, "--out", root / "all.csv"],
                 code=2, words=("both shard 0/2",), roots=(assets["root"], root))
    third = root / "third.csv"  # a shard of another campaign's count: its .json says 0/3
    shutil.copy(shards["parts"][0], third)
    record = json.loads(shards["parts"][0].with_name("part0.csv.json").read_text())
    (root / "third.csv.json").write_text(json.dumps({**record, "shard": "0/3"}))
    check_attack("merge shards of 2 and of 3", ["merge", shards["parts"][1], third, "--out", root / "all.csv"],
                 code=2, words=("different counts",), roots=(assets["root"], root))


@pytest.mark.parametrize("edit", ["a row of another shard", "a row twice"])
def test_merge_refuses_rows_a_shard_cannot_hold(assets, shards, edit):
    part0, part1 = shards["parts"][0], shards["parts"][1]
    lines0, lines1 = part0.read_text().splitlines(True), part1.read_text().splitlines(True)
    if edit == "a row twice":
        part0.write_text("".join(lines0 + lines0[1:2]))
    else:
        part0.write_text("".join(lines0 + lines1[1:2]))
    check_attack(f"merge a shard CSV edited to hold {edit}", ["merge", part0, part1, "--out", shards["root"] / "a.csv"],
                 code=2, words=("merge", "line"), roots=(assets["root"], shards["root"]))


def test_in_shard_puts_every_path_in_exactly_one_shard():
    names = [f"img_{i}.png" for i in range(50)]
    assert all(sum(in_shard(n, (i, 3)) for i in range(3)) == 1 for n in names)


# ---- predict to standard output --------------------------------------------------------------

def test_predict_out_dash_writes_the_csv_to_stdout(assets, tmp_path):
    proc = check_attack_process("predict --out - (CSV on stdout)", predict(assets["onnx"], [assets["images"]], "-"),
                                code=0, roots=(assets["root"],), cwd=tmp_path, timeout=120)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"ok", "rejected"}
    assert "images:" in proc.stderr and "images:" not in proc.stdout  # the summary stays off the data
    assert not (tmp_path / "-").exists() and not list(tmp_path.iterdir())


def test_predict_out_dash_refuses_resume(assets, tmp_path):
    check_attack("predict --out - --resume", predict(assets["onnx"], [assets["images"]], "-", "--resume"), code=2,
                 words=("--out -", "--resume"), roots=(assets["root"],))


# ---- train --resume --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> dict:
    """A 1-epoch run (of 3) on its own copy of a tiny split: what an interrupted run leaves."""
    from attacks import RUNNER
    from crystalscope.cli import app

    root = tmp_path_factory.mktemp("resume")
    split = make_split(root / "split", {"train": (6, 6), "val": (3, 3), "test": (3, 3)}, size=32)
    run = root / "run"
    result = RUNNER.invoke(app, ["train", str(split), "--backbone", "resnet18", "--weights", "none", "--image-size",
                                 "32", "--epochs", "1", "--batch-size", "6", "--out", str(run), "--no-onnx",
                                 "--f1-threshold", "1.1", "--reject-fpr", "0"])
    assert result.exit_code == 0, result.output
    return {"split": split, "run": run, "root": root}


@pytest.mark.parametrize("override,words", [(["--lr", "0.5"], ("--lr", "was 0.1")),
                                            (["--backbone", "resnet34"], ("--backbone",)),
                                            (["--image-size", "48"], ("--image-size",)),
                                            (["--seed", "7"], ("--seed",))])
def test_train_resume_refuses_a_changed_recipe(one_epoch, override, words):
    check_attack(f"train --resume with {' '.join(override)}", ["train", "--resume", one_epoch["run"], *override],
                 code=2, words=("--resume", "only --epochs", *words), roots=(one_epoch["root"],))


def test_train_resume_refuses_a_changed_split(one_epoch, tmp_path):
    moved = tmp_path / "split"
    shutil.copytree(one_epoch["split"], moved)
    victim = sorted((moved / "train" / "CEX").glob("*.png"))[0]
    victim.write_bytes(sorted((moved / "train" / "PG").glob("*.png"))[0].read_bytes())  # one image replaced
    check_attack("train --resume on the split with one image replaced", ["train", moved, "--resume", one_epoch["run"]],
                 code=2, words=("train split", "changed"), roots=(one_epoch["root"], tmp_path))


def test_train_resume_may_run_longer(one_epoch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch["run"], run)
    check_attack("train --resume with --epochs 2 (more epochs: allowed)", ["train", "--resume", run, "--epochs", "2"],
                 code=0, roots=(one_epoch["root"],))
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert [m["epoch"] for m in metrics] == ["1", "2"]
